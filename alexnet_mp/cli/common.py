"""What every entry point reads from torchrun's environment, and how it reports bad input."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from alexnet_mp.cli.process import configure_process
from alexnet_mp.config import Config, load_config
from alexnet_mp.errors import UserError
from alexnet_mp.parallel.layout import Layout, setup_layout
from alexnet_mp.parallel.startup import launch_env

PACKAGE = Path(__file__).resolve().parents[1]


def default_config() -> Path:
    """configs/default.yaml, through the package: in a clone ``alexnet_mp/configs`` links to
    the clone's folder, and a wheel holds the files. A checkout that lost the link (a copy
    that skips links, git without symlinks) reads the clone's folder itself."""
    packaged = PACKAGE / "configs" / "default.yaml"
    return packaged if packaged.is_file() else PACKAGE.parent / "configs" / "default.yaml"


def config_from_args(args: argparse.Namespace) -> Config:
    """``--config`` (default configs/default.yaml) with the command line's overrides on top."""
    return load_config(args.config, args.overrides, default_path=default_config())


def env_rank() -> int:
    """``RANK`` (0 when absent or not a number: its own check reports it)."""
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


def layout_from_env(cfg: Config, model_name: str) -> Layout:
    """The layout for this process from torchrun's variables (absent: one process), or srun's
    set by hand; a bad one is one line naming it."""
    env = launch_env(os.environ)
    layout = setup_layout(
        model_name, rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
        local_world_size=env.local_world_size, device=cfg.run.device,
        timeout_s=cfg.run.timeout_s, save_timeout_s=cfg.run.save_timeout_s,
        columns=cfg.parallel.columns, layout=cfg.parallel.layout, attempt=env.attempt,
        master_addr=env.master_addr, master_port=env.master_port,
        agent_store=env.agent_store, startup_timeout_s=cfg.run.startup_timeout_s)
    configure_process(layout.device, threads=cfg.run.threads,
                      local_world_size=env.local_world_size,
                      keep_host_memory=cfg.run.keep_host_memory,
                      cudnn_benchmark=cfg.run.cudnn_benchmark)
    return layout


def restarts_from_env() -> tuple[int, int] | None:
    """torchrun's (--max-restarts, restarts so far), which it gives its workers; None without
    torchrun."""
    env = os.environ
    if "TORCHELASTIC_MAX_RESTARTS" not in env:
        return None
    try:
        return (int(env["TORCHELASTIC_MAX_RESTARTS"]),
                int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    except ValueError:
        return None


def report(exc: UserError) -> int:
    """One line on stderr (rank 0, the rank whose group broke, or the rank that alone knows of
    its error: a bad launch variable, a rendezvous not all came to, a device out of memory);
    returns the exit code."""
    broken = getattr(exc, "broken_group", False)
    if env_rank() == 0 or broken or getattr(exc, "every_rank", False):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if broken:
        # Tearing down a group whose peer is gone can abort the process; leave at once.
        sys.stdout.flush()
        os._exit(exc.exit_code)
    return exc.exit_code


def guarded(body: Callable[[Callable[[Config, str], Layout]], int | None],
             interrupted: Callable[[], str]) -> int:
    """``body(open_layout)`` with what every entry point owes its user: bad input is one line and
    its exit code, Ctrl-C is 130 with ``interrupted()`` said, and the process group
    ``open_layout(cfg, model_name)`` started is closed, on failure too."""
    opened: list[Layout] = []

    def open_layout(cfg: Config, model_name: str) -> Layout:
        opened.append(layout_from_env(cfg, model_name))
        return opened[-1]

    try:
        return body(open_layout) or 0
    except UserError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr, flush=True)
        return 130
    finally:
        for layout in opened:
            layout.close()


def training_interrupted(cfg: Config) -> str:
    """What a second Ctrl-C during training leaves: the checkpoint a rerun resumes from, named
    by the rank that writes them."""
    if env_rank() != 0:
        return "interrupted"
    from alexnet_mp.checkpoint import newest_line
    from alexnet_mp.config import run_dir

    return f"interrupted; {newest_line(run_dir(cfg) / 'checkpoints')}"


def run_entry(args: argparse.Namespace,
              body: Callable[[Config, Callable[[str], Layout]], int | None],
              interrupted: Callable[[Config], str] | None = None) -> int:
    """Config from the command line, then ``body(cfg, open_layout)``, whose result is the exit
    code (None: 0); see :func:`guarded`. ``interrupted(cfg)`` is said on Ctrl-C."""
    read: list[Config] = []

    def with_config(open_layout: Callable[[Config, str], Layout]) -> int | None:
        read.append(config_from_args(args))
        cfg = read[0]
        return body(cfg, lambda model_name: open_layout(cfg, model_name))

    return guarded(with_config, lambda: interrupted(read[0]) if interrupted and read
                    else "interrupted")


def run_checkpoint_entry(body: Callable[[Callable[[Config], Layout]], int | None]) -> int:
    """For entry points whose config comes from a checkpoint (evaluate, predict), not from
    ``--config``: ``body(open_layout)``, where ``open_layout(cfg)`` starts this process's place
    for the model ``cfg`` names (torchrun's variables, or one process); see :func:`guarded`."""
    # Nothing is written before the end, so an interrupted evaluation leaves nothing half done.
    return guarded(lambda open_layout: body(lambda cfg: open_layout(cfg, cfg.model.name)),
                    lambda: "interrupted")
