"""Ranks that read different shares of each batch agree on it before they step together.

Replicas (and the hybrid layout's ranks) each read their own share of the global batch, so an
unreadable image turns up on one rank only. Left alone, that rank would stop (``data.bad_images=
stop``) while the others waited in the step's first collective until the timeout and reported a
lost peer; or (``skip``) its share would come out one example short, and the hybrid layout's
gather, which needs every rank's rows, would fail. So each batch, before any collective of the
step, the ranks exchange four numbers: did every share read, did any leave a file out, and the
largest and smallest share. A failed read stops every rank with the same one-line error, naming
the file (rank 0 prints it); files left out are told to every rank, so that rank 0's log names
them all. Training trims every share to the smallest, so that the replicas average equal shares;
evaluation pads the short ones with examples labelled -1, which it does not count, so that every
readable test image is counted once. Ranks that read the same batch (the columns of one replica)
hit the same files and need none of this: the loader is only wrapped where the data is sharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from alexnet_mp.errors import UserError, peer_errors

if TYPE_CHECKING:
    from alexnet_mp.parallel.layout import Layout


class AgreedShards:
    """``loader``'s batches, agreed over ``group`` (every rank of the step) each time.

    ``pad`` False (training): every share is cut to the smallest; True (evaluation): the short
    shares are filled up to the largest with copies of their last example, labelled -1.
    Everything else (``sampler``, ``batch_size``, ``bad_files``) is the loader's own.
    """

    def __init__(self, loader: Any, group: dist.ProcessGroup | None, device: torch.device,
                 pad: bool) -> None:
        self.loader, self.group, self.device, self.pad = loader, group, device, pad

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        batches = iter(self.loader)
        bad_files = self.loader.bad_files
        while True:
            error: UserError | None = None
            known = len(bad_files)
            try:
                batch = next(batches)
            except StopIteration:
                return  # every share has the same number of batches (the sampler pads)
            except UserError as exc:
                batch, error = None, exc
            rows = 0 if batch is None else int(batch[1].shape[0])
            dropped = len(bad_files) - known
            # One MAX all-reduce answers all four: the largest share, and (as minus the largest
            # negated share) the smallest.
            flags = torch.tensor([float(error is not None), float(dropped), float(rows),
                                  -float(rows)], device=self.device)
            with peer_errors("agreeing on the batch between ranks that read different shares"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
                failed, any_dropped, most, fewest = flags.tolist()
                if failed:
                    batches = iter(())  # let the loader's workers go before the error travels
                    raise UserError(next(m for m in self._gather(error and str(error)) if m))
                if any_dropped:  # every rank learns every file left out (rank 0 reports them)
                    # The columns of one replica read the same files: each is named once.
                    bad_files[known:] = list(dict.fromkeys(
                        f for files in self._gather(bad_files[known:]) for f in files))
            yield self._even(batch, int(most) if self.pad else -int(fewest))

    def _gather(self, mine: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, mine, group=self.group)
        return out

    @staticmethod
    def _even(batch: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        x, y = batch[0], batch[1]
        have = x.shape[0]
        if have > rows:
            return [x[:rows], y[:rows]]
        if have < rows:
            fill = rows - have
            x = torch.cat([x, x[-1:].expand(fill, *x.shape[1:])])
            y = torch.cat([y, y.new_full((fill,), -1)])
        return [x, y]


def agreed(loader: Any, layout: Layout, *, pad: bool) -> Any:
    """``loader`` wrapped in :class:`AgreedShards` where ``layout``'s ranks read different
    shares (replicas, hybrid), else ``loader`` itself."""
    if not layout.distributed or layout.data_shards == 1:
        return loader
    return AgreedShards(loader, layout.step_group, layout.device, pad)
