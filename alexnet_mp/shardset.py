"""Prepared shards (``data.name=shards``): the format, and the data set that reads one record.

``launch/prepare_data.py FOLDER OUT`` (:mod:`alexnet_mp.prepare`) writes, under OUT::

    manifest.json        format, short side, JPEG quality, class names, per split its shards
                         (file, bytes, sha256, records) and index (file, sha256), and the
                         unreadable files it left out
    train/shard-00000.bin  records concatenated: each image scaled to a short side of 256 (the
                         paper's) and stored as a JPEG file
    train/shard-00000.idx  that shard's records: offset, length, label, crc32, height, width
    train/index.bin      the split's records, in order: the shard's number, then the six above
    val/...

Indices and sidecars are little-endian int64 rows. A record is read with one ``pread`` of its
own bytes, so a replica reading its share touches only its records (shared storage serves every
node), and its crc32 is checked as it is read: a damaged record is caught at the cost of a
checksum over 30-100 KB, never a whole shard's sha256.

Damage is one line naming the file, with the fix: re-run prepare_data.py, which keeps the shards
that match the manifest and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from alexnet_mp.config import DataConfig
from alexnet_mp.device_decode import ShardSample, crop, decode
from alexnet_mp.errors import UserError
from alexnet_mp.lighting import lighting_components

FORMAT = "alexnet_mp/shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
INDEX = "index.bin"
SIDECAR_FIELDS = ("offset", "length", "label", "crc32", "height", "width")
INDEX_FIELDS = ("shard", *SIDECAR_FIELDS)
LIGHTING_SIGMA = 0.1  # the paper's


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def sidecar_name(number: int) -> str:
    return f"shard-{number:05d}.idx"


def redo(root: str | Path) -> str:
    return (f"re-run python launch/prepare_data.py FOLDER {root} (it keeps the intact shards and "
            "redoes the rest)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def rows(raw: bytes, fields: int) -> torch.Tensor:
    """int64 rows from little-endian bytes (over a writable copy: the buffer may be
    read-only)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).view(-1, fields)


class DamagedShardError(UserError):
    """A shard, its index or the manifest cannot be used; one line naming the file and the fix.

    Raised in a loader worker, it reaches the main process re-raised as this type, with the
    worker's whole traceback as its text; its last line is the message itself, which is all
    the user should see.
    """

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        name = f"{type(self).__module__}.{type(self).__qualname__}: "
        super().__init__(last.removeprefix(name) if last.startswith(name) else last)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """OUT/manifest.json of a finished conversion; anything else is one line."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"data.name=shards: data.root {root} is not a folder; set it to the OUT "
                        "folder of python launch/prepare_data.py FOLDER OUT")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"data.name=shards: {path} does not exist; set data.root to the OUT "
                        "folder of python launch/prepare_data.py FOLDER OUT, or run it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedShardError(f"shard manifest {path} is unreadable ({exc}); "
                                f"{redo(root)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DamagedShardError(f"{path} is not a manifest of format {FORMAT}; {redo(root)}")
    if not manifest.get("complete"):
        raise UserError(f"the conversion into {root} did not finish ({path} says so); "
                        f"{redo(root)}")
    return manifest


def load_index(root: Path, split: str, manifest: dict[str, Any]) -> torch.Tensor:
    """The split's index, checked against the manifest's sha256; shard files checked to exist
    with the manifest's size (a truncated copy is caught here, before any training)."""
    entry = manifest["splits"][split]
    path = root / split / INDEX
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DamagedShardError(f"shard index {path} is unreadable ({exc.strerror or exc}); "
                                f"{redo(root)}") from None
    if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
        raise DamagedShardError(f"shard index {path} does not match its checksum in "
                                f"{root / MANIFEST}; {redo(root)}")
    index = rows(raw, len(INDEX_FIELDS))
    for shard in entry["shards"]:
        file = root / split / shard["file"]
        try:
            size = file.stat().st_size
        except OSError:
            raise DamagedShardError(f"shard {file} is missing; {redo(root)}") from None
        if size != shard["bytes"]:
            raise DamagedShardError(f"shard {file} holds {size} bytes, its manifest entry "
                                    f"{shard['bytes']} (truncated or replaced); {redo(root)}")
    return index


class ShardDataset(Dataset):
    """One split of a prepared folder: item ``i`` is (:class:`ShardSample`, label), passed
    through ``transform`` (a :class:`ShardView`) when it is set.

    It pickles without open files: each process opens a shard when it first reads from it.
    """

    def __init__(self, root: str | Path, split: str, transform: Any = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        manifest = read_manifest(self.root)
        if split not in manifest.get("splits", {}):
            raise DamagedShardError(f"{self.root / MANIFEST} has no split '{split}'; "
                                    f"{redo(self.root)}")
        self.classes: list[str] = [str(c) for c in manifest["classes"]]
        self.short_side = int(manifest["short_side"])
        self.files = [self.root / split / s["file"] for s in manifest["splits"][split]["shards"]]
        self.index = load_index(self.root, split, manifest)
        self.targets = self.index[:, 3].tolist()
        self._rows = self.index.tolist()  # plain numbers: indexing a tensor costs microseconds
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def __len__(self) -> int:
        return len(self._rows)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are shared
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.files[shard], os.O_RDONLY)
            except OSError as exc:
                raise DamagedShardError(f"shard {self.files[shard]} cannot be opened "
                                        f"({exc.strerror}); {redo(self.root)}") from None
            self._fds[shard] = fd
        return fd

    def read(self, index: int) -> torch.Tensor:
        """Record ``index``'s JPEG bytes, checked against its crc32."""
        shard, offset, length, _, crc, _, _ = self._rows[index]
        buf = bytearray(length)
        got = os.preadv(self._fd(shard), [buf], offset)
        if got != length or zlib.crc32(buf) != crc:
            why = "ends early" if got != length else "fails its crc32"
            raise DamagedShardError(f"shard {self.files[shard]}: record at byte {offset} {why} "
                                    f"(damaged file); {redo(self.root)}")
        return torch.frombuffer(buf, dtype=torch.uint8)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self._rows[index]
        sample = ShardSample(self.read(index), row[5], row[6])
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, row[3]

    def whole_views(self) -> None:
        """Evaluation sees the whole central square (the ten crops are cut from it)."""
        self.transform = self.transform.whole()


class ShardView:
    """Chooses a record's view, from torch's global generator (which
    :class:`alexnet_mp.data.SeededTransform` seeds per sample) when random.

    ``side``: the crop's side in stored pixels; ``random``: a random crop (else the centre),
    mirrored with ``hflip`` at random, lit by ``lighting`` (eigval, eigvec) with the paper's
    sigma; ``whole_square``: the central square of the short side instead. ``decode``: decode
    and crop here (in the loader worker), else leave the bytes for the device. The draws come in
    the order torchvision's RandomCrop, RandomHorizontalFlip and our Lighting make them.
    """

    def __init__(self, side: int, *, random: bool = False, hflip: bool = False,
                 lighting: tuple[torch.Tensor, torch.Tensor] | None = None,
                 decode: bool = True, whole_square: bool = False) -> None:
        self.side, self.random, self.hflip, self.lighting = side, random, hflip, lighting
        self.decode, self.whole_square = decode, whole_square
        # eigvec scaled by eigval, as plain numbers: three small products per image cost less in
        # Python than a 3 x 3 tensor product.
        self._shift = (None if lighting is None else
                       (lighting[1] * lighting[0].view(1, 3)).tolist())

    def whole(self) -> ShardView:
        return ShardView(self.side, decode=self.decode, whole_square=True)

    def __call__(self, s: ShardSample) -> ShardSample:
        h, w = s.height, s.width
        side = min(h, w) if self.whole_square else min(self.side, h, w)
        if self.random:
            top = int(torch.randint(0, h - side + 1, size=(1,)))
            left = int(torch.randint(0, w - side + 1, size=(1,)))
            s.flip = self.hflip and bool(torch.rand(1) < 0.5)
            if self._shift is not None:
                alpha = (torch.randn(3) * LIGHTING_SIGMA).tolist()
                s.rgb = tuple(sum(row[j] * alpha[j] for j in range(3)) for row in self._shift)
        else:  # torchvision's center_crop rounds the same way
            top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        s.box = (top, left, side, side)
        if self.decode:
            s.image = crop(decode(s.data), s.box)  # a view: the batch's stack copies it
            s.data = None
        return s


def crop_side(image_size: int, short_side: int) -> int:
    """The crop, in stored pixels, that is ``image_size`` at the scale the image-folder path
    uses (its 256/227 of the input): 227 of 256 for the paper's input."""
    return round(image_size * short_side / round(image_size * 256 / 227))


def shard_sets(cfg: DataConfig, *, decode: bool) -> tuple[ShardDataset, ShardDataset, ShardView]:
    """(train without its view, val with its centre view, the training view) for
    ``data.name=shards``; the caller seeds the training view per sample."""
    train = ShardDataset(cfg.root, "train")
    side = crop_side(cfg.image_size, train.short_side)
    centre = ShardView(side, decode=decode)
    test = ShardDataset(cfg.root, "val", centre)
    if not cfg.augment:
        return train, test, centre
    return train, test, ShardView(side, random=True, hflip=cfg.hflip,
                                  lighting=lighting_components(cfg), decode=decode)
