"""The run's JSONL metrics log, its TensorBoard mirror and the PNG of its curves (what d2l's
animator drew)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from alexnet_mp.errors import UserError


class MetricsLog:
    """Appends one JSON object a line; a resumed run continues the same file.

    ``records`` counts the lines written so far. A checkpoint stores it, and a run resumed from
    that checkpoint cuts the file back to it (:meth:`truncate`), so the lines an interrupted run
    wrote after its last checkpoint are not there twice: the log equals a straight run's.

    ``tensorboard``: a folder for TensorBoard event files that mirror every line (see
    :class:`TensorBoardLog`); a missing tensorboard package is a :class:`UserError` here, before
    any training.
    """

    def __init__(self, path: Path, enabled: bool = True, tensorboard: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.records = len(self._lines()) if enabled else 0
        self.tensorboard = (TensorBoardLog(tensorboard, self.path)
                            if enabled and tensorboard is not None else None)

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [line for line in self.path.read_text().splitlines(keepends=True)
                if line.endswith("\n")]  # a line torn by a kill has no newline yet

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            # Only rank 0 writes here: failing would leave the other ranks waiting in the next
            # collective. The run goes on; a checkpoint that cannot be written then stops every
            # rank together, in one line.
            _warn_once(f"could not write to '{self.path}' ({exc.strerror}); training goes on "
                       "without these lines")
            return
        self.records += 1
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def truncate(self, records: int) -> None:
        """Keep the first ``records`` lines (those before the checkpoint a run resumes from)."""
        if not self.enabled:
            return
        kept = self._lines()[:records]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        self.records = len(kept)
        if self.tensorboard is not None:
            self.tensorboard.close()  # the next line rebuilds the event files from the kept ones


def summary_writer_class() -> type:
    """torch's SummaryWriter, or one line saying how to install what it needs."""
    try:
        # torch.utils.tensorboard may be importable (or already imported) while the package it
        # writes with is not; asking for the package first makes its absence the error.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("run.tensorboard=true needs the tensorboard package: pip install -e "
                        "'.[tensorboard]' (or pip install tensorboard), or set "
                        "run.tensorboard=false") from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """A metrics.jsonl line's numbers as TensorBoard tags ``<kind>/<field>``; its global step is
    the x axis, and flags, lists and the epoch number are not curves."""
    kind = record.get("kind", "record")
    return [(f"{kind}/{key}", float(value)) for key, value in record.items()
            if key not in ("kind", "step", "epoch") and isinstance(value, (int, float))
            and not isinstance(value, bool)]


class TensorBoardLog:
    """TensorBoard event files in ``folder`` holding exactly the numbers of ``jsonl``.

    The writer opens at the first line written; it then removes the folder's earlier event files
    and replays the whole JSONL file. A resumed run has cut that file back to its checkpoint
    (:meth:`MetricsLog.truncate`), so the curves never show the lines an interrupted run wrote
    after it, the way metrics.jsonl does not.
    """

    def __init__(self, folder: Path, jsonl: Path) -> None:
        self.folder, self.jsonl = folder, jsonl
        self.writer_class = summary_writer_class()
        self.writer: Any = None
        self.broken = False

    def write(self, record: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            if self.writer is None:
                self._open()  # the replay includes ``record``, already in the JSONL file
            else:
                self._add(record)
            if record.get("kind") != "step":
                self.writer.flush()
        except OSError as exc:  # as for metrics.jsonl: rank 0 alone must not stop the run
            self.broken = True
            _warn_once(f"could not write TensorBoard files in '{self.folder}' ({exc.strerror}); "
                       "training goes on without them")

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = self.writer_class(log_dir=str(self.folder))
        for record in read_log(self.jsonl):
            self._add(record)

    def _add(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if isinstance(step, int):
            for tag, value in scalars(record):
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        print(f"warning: {text}", file=sys.stderr, flush=True)


def append_json(path: Path, record: dict[str, Any]) -> None:
    """One line of a run folder's history (starts, resumes, stops, and the config each used)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError as exc:
        _warn_once(f"could not write to '{path}' ({exc.strerror})")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill is skipped, not fatal
    return records


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Train loss, train accuracy and test accuracy against epoch, one figure."""
    epochs: dict[int, dict[str, Any]] = {}
    for r in read_log(log_path):
        if r.get("kind") == "epoch":
            epochs[r["epoch"]] = r  # a resumed epoch's later record wins
    # Imported here, not with the module: half a second of every rank's start-up, for a figure
    # only rank 0 draws, once an epoch. So a broken matplotlib shows up here, mid-run and on
    # rank 0 alone, where it must not end the run any more than a full disk does.
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training machines
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - any import failure: the figure is optional
        _warn_once(f"could not draw '{png_path}': matplotlib does not import "
                   f"({type(exc).__name__}: {exc})")
        return

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = sorted(epochs)
    for key, label, style in (("train_loss", "train loss", "-"), ("train_acc", "train acc", "--"),
                              ("test_acc", "test acc", "-.")):
        ys = [epochs[e].get(key) for e in xs]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, style, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    if xs:
        ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(png_path)
    except OSError as exc:  # a full disk must not end the run here, on rank 0 alone
        tmp.unlink(missing_ok=True)
        _warn_once(f"could not draw '{png_path}' ({exc.strerror})")
    finally:
        plt.close(fig)
