#!/usr/bin/env bash
# One command for a machine with CUDA, one JSON of figures at the end:
#   1. the CUDA tests (tests/test_cuda.py): NCCL through every collective, the fused LRN,
#      autocast, steady training steps under torch.cuda.set_sync_debug_mode("error") (no host
#      sync), prepared shards decoded on the GPU against the CPU decode;
#   2. images/s of d2l and grouped at 227 px, bf16, batch 256, on synthetic data;
#   3. the input path per loader core (image folder with PIL, shards decoded on the CPU, shards
#      read as bytes for the GPU) on 500x375 JPEGs;
#   4. the training loop on prepared shards decoded on the GPU against synthetic data, the same
#      two models and settings as 2;
#   5. a profiled run for the per-layer table.
#
#   scripts/gpu_check.sh [OUT_DIR]            OUT_DIR: $OUT if set, else runs/gpu-check
#   scripts/gpu_check.sh --dry-run [OUT_DIR]  the same steps on the CPU at a tiny size, to check
#                                             the script itself where there is no GPU
#
# Meant to take under five minutes on one GPU (an estimate until it has run on one; every step
# has its own timeout, and with two GPUs the split tests add about two more). One GPU cannot run
# the two-GPU column split: those tests are skipped there, and say so. Writes
# OUT_DIR/figures.json whatever happens; exits non-zero if a test failed or a step did not
# finish.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
out="${1:-${OUT:-runs/gpu-check}}"
mkdir -p "$out"
: > "$out/steps.txt"
status=0
started=$SECONDS

run_step() {  # run_step NAME LIMIT_SECONDS COMMAND...: logged, timed, a failure noted, go on
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$out/steps.txt"
  tail -n 4 "$out/$name.log" || true
  if (( rc != 0 )); then
    echo "!! $name exited $rc (124: timed out); log: $out/$name.log"
    status=1
  fi
}

if (( dry )); then
  device=cpu
  paper=(model.num_classes=10 model.in_channels=3 data.name=fake data.image_size=67
         train.batch_size=8 model.width=0.125)
  shards=(model.num_classes=2 model.in_channels=3 data.image_size=67 train.batch_size=8
          model.width=0.125 data.num_workers=1)
  photos=48
  timing=(--repeat 2 --steps 1 --warmup 0)
  input_rounds=1
else
  device=cuda
  if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch; scripts/gpu_check.sh --dry-run checks the script" >&2
    exit 2
  fi
  paper=(model.num_classes=1000 model.in_channels=3 data.name=fake data.image_size=227
         train.batch_size=256 train.amp=bf16)
  shards=(model.num_classes=2 model.in_channels=3 data.image_size=227 train.batch_size=256
          train.amp=bf16 data.num_workers=$(( $(nproc) > 13 ? 12 : $(nproc) - 1 )))
  photos=4096
  timing=(--repeat 3 --steps 20 --warmup 5)
  input_rounds=2
fi

python - "$out/env.json" <<'PY' || echo '{"error": "could not describe the machine"}' > "$out/env.json"
import json, platform, subprocess, sys
import torch


def fact(read):
    try:
        return read()
    except Exception as exc:  # a missing library or tool is a fact too, not a reason to stop
        return f"unavailable ({type(exc).__name__})"


cuda = torch.cuda.is_available()
env = {"torch": torch.__version__, "cuda": torch.version.cuda,
       "python": platform.python_version(),
       "gpus": fact(lambda: [torch.cuda.get_device_name(i)
                             for i in range(torch.cuda.device_count())]),
       "nccl": fact(lambda: str(torch.cuda.nccl.version())) if cuda else None,
       "cudnn": fact(torch.backends.cudnn.version) if cuda else None,
       "nvidia_smi": fact(lambda: subprocess.run(
           ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip())}
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
PY

run_step cuda-tests 240 python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  --junitxml="$out/cuda-tests.xml"
run_step bench-paper 120 python launch/bench.py --layouts d2l,grouped --data synthetic \
  "${timing[@]}" --out "$out/bench-paper" "${paper[@]}" run.device=$device
run_step input-path 90 python launch/bench.py --input-path --repeat $input_rounds \
  --out "$out/input-path"
# A folder of ImageNet-sized JPEGs large enough for whole batches of 256, and its shards.
run_step shards-photos 90 python scripts/make_photos.py "$out/photos" $photos
run_step shards-prepare 90 python launch/prepare_data.py "$out/photos" "$out/shards"
run_step bench-shards 150 python launch/bench.py --layouts d2l,grouped --data synthetic,train \
  "${timing[@]}" --out "$out/bench-shards" "${shards[@]}" data.name=shards \
  data.root="$out/shards" data.augment=true run.device=$device
# Last, so that a failure of the profiler cannot cost the figures above.
run_step bench-profile 90 python launch/bench.py --layouts grouped --data synthetic \
  --repeat 1 --steps 3 --warmup 2 --profile --out "$out/bench-profile" "${paper[@]}" \
  run.device=$device
rm -rf "$out/photos" "$out/shards"  # tens of MB that no figure needs

python scripts/gpu_figures.py "$out" $((SECONDS - started)) > "$out/figures.json" || status=1
echo "figures: $out/figures.json ($((SECONDS - started)) s)"
exit $status
