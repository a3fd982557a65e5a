"""How long a checkpoint save blocks the training loop, written synchronously and in the
background (``run.async_checkpoint``).

The real :class:`~alexnet_mp.checkpoint_manager.CheckpointManager` saves the grouped model at
the config's width and classes with its SGD momentum state, into a scratch run folder. Blocked:
the time ``save()`` takes on the calling thread. For the background arm the write it started is
then waited for, untimed, so that every round starts from a settled folder.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.checkpoint_manager import CheckpointManager
from alexnet_mp.config import Config
from alexnet_mp.engine import Precision, TrainState
from alexnet_mp.metrics import MetricsLog
from alexnet_mp.optim import build_optimizer
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout


def _manager(cfg: Config, layout: Layout, folder: Path, background: bool) -> CheckpointManager:
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, async_checkpoint=background))
    model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    for group in optimizer.param_groups:  # the momentum a trained run carries
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    folder.mkdir(parents=True, exist_ok=True)
    return CheckpointManager(folder, cfg, layout, model=model, optimizer=optimizer,
                             scheduler=None, precision=Precision("fp32", layout.device),
                             log=MetricsLog(folder / "metrics.jsonl", enabled=False),
                             data_info={}, warn=lambda text: None, agree=layout.agree)


def saves_bench(cfg: Config, layout: Layout, work: Path, rounds: int = 3,
                say: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Per arm (``sync``, ``async``): the seconds ``save()`` blocked the caller, each round;
    for ``async`` also the seconds until its write was on disk. Arms alternate by round."""
    managers = {arm: _manager(cfg, layout, work / arm, arm == "async") for arm in ("sync", "async")}
    params = sum(p.numel() for p in managers["sync"].model.parameters())
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    written: list[float] = []
    for r in range(rounds):
        for arm, manager in managers.items():
            state = TrainState(global_step=r + 1)
            start = time.perf_counter()
            manager.save(state)
            blocked[arm].append(time.perf_counter() - start)
            if arm == "async":
                manager.finish()
                written.append(time.perf_counter() - start)
            say(f"round {r + 1}/{rounds} {arm}: blocked {blocked[arm][-1]:.3f} s")
    size = (work / "sync" / f"step-{rounds:08d}.pt").stat().st_size
    sync, background = statistics.median(blocked["sync"]), statistics.median(blocked["async"])
    return {"model": cfg.model.name, "parameters": params, "file_bytes": size,
            "rounds": rounds, "blocked_s": blocked, "async_written_s": written,
            "sync_blocked_s": sync, "async_blocked_s": background,
            "async_fraction": background / sync}


def saves_markdown(result: dict[str, Any]) -> str:
    return "\n".join([
        f"checkpoint saves: {result['model']}, {result['parameters'] / 1e6:.1f} M parameters, "
        f"{result['file_bytes'] / 2**20:.0f} MiB per file, median of {result['rounds']} rounds",
        "",
        "| save | loop blocked (s) | until on disk (s) |",
        "| --- | --- | --- |",
        f"| synchronous | {result['sync_blocked_s']:.3f} | {result['sync_blocked_s']:.3f} |",
        f"| background (run.async_checkpoint) | {result['async_blocked_s']:.3f} | "
        f"{statistics.median(result['async_written_s']):.3f} |",
        "",
        f"background blocks the loop for {100 * result['async_fraction']:.1f} % of a "
        "synchronous save",
    ])


def saves(args, cfg: Config, open_layout: Callable[[str], Layout]) -> None:
    """``launch/bench.py --saves``: the table printed, and saves.json under ``--out``."""
    import json
    import tempfile

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="alexnet_grouped"))
    layout = open_layout(cfg.model.name)
    with tempfile.TemporaryDirectory() as tmp:
        result = saves_bench(cfg, layout, Path(tmp), rounds=max(2, args.repeat),
                             say=lambda text: print(text, flush=True))
    print(saves_markdown(result), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "saves.json").write_text(json.dumps(result, indent=1))
