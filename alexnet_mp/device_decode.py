"""Prepared shards' samples on their way to the model, and the batched work done on the device.

A loader worker hands over, per image, either its JPEG bytes (CUDA: decoded on the device) or
its crop already decoded (CPU: decoded in the worker, so that decoding stays parallel), with the
augmentation drawn for it as numbers: the crop box, the mirror bit and the PCA lighting's RGB
shift. :func:`to_pixels` turns a batch of them into float images in [0, 1]: decode (bytes only),
crop, mirror, lighting; :class:`alexnet_mp.data.BatchTransform` then resizes and normalises as
it does for every data set. Training and evaluation both go through that one module.

Public API::

    batch = collate_samples([ShardSample, ...])      # what the loader's collate returns
    batch = batch.to(device, non_blocking=True)       # the numbers move, the bytes stay in host
                                                      # memory, where decode_jpeg reads them
    batch.pin_memory(), batch.record_stream(s), len(batch), batch.shape   # as a Tensor's
    x = BatchTransform(size, mean, std).to(device)(batch)   # normalised N x 3 x size x size
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate_fn_map
from torchvision.io import ImageReadMode, decode_jpeg


class ShardSample:
    """One record of a shard: its JPEG ``data`` and stored size; once a view is chosen, the
    crop ``box`` (top, left, height, width), ``flip`` and the lighting's ``rgb`` shift; with
    decoding in the loader, ``image``, the decoded crop (uint8, 3 x height x width)."""

    __slots__ = ("data", "height", "width", "box", "flip", "rgb", "image")

    def __init__(self, data: torch.Tensor | None, height: int, width: int) -> None:
        self.data, self.height, self.width = data, height, width
        self.box: tuple[int, int, int, int] = (0, 0, height, width)
        self.flip = False
        self.rgb: tuple[float, float, float] | None = None
        self.image: torch.Tensor | None = None


def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, height, width = box
    return image[..., top:top + height, left:left + width]


def decode(data: torch.Tensor | list[torch.Tensor], device: torch.device | str = "cpu"
           ) -> torch.Tensor | list[torch.Tensor]:
    """JPEG bytes (one uint8 tensor or a list) to RGB uint8 images on ``device``."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class ShardBatch:
    """A batch of :class:`ShardSample`: either the JPEG files concatenated in ``data`` (their
    ``lengths``) with their crop ``boxes``, or the decoded crops stacked in ``images``; the
    mirror bits and RGB shifts per image.

    One concatenated tensor rather than a list: a loader worker passes each tensor through its
    own shared-memory segment, which for hundreds of small files costs more than the bytes.
    The boxes stay on the host (slicing needs them as numbers, and reading them back from a
    GPU would make the step wait); ``pin_memory`` and ``to`` are what the DataLoader and the
    training loop call on a batch.
    """

    def __init__(self, flip: torch.Tensor, rgb: torch.Tensor | None, *,
                 data: torch.Tensor | None = None, lengths: list[int] | None = None,
                 boxes: list[tuple[int, int, int, int]] | None = None,
                 images: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        self.flip, self.rgb = flip, rgb
        self.data, self.lengths, self.boxes, self.images = data, lengths, boxes, images
        self.device = device if device is not None else flip.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.flip.shape[0]])

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def pin_memory(self) -> ShardBatch:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return ShardBatch(pin(self.flip), pin(self.rgb), data=pin(self.data),
                          lengths=self.lengths, boxes=self.boxes, images=pin(self.images))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """As Tensor.record_stream, for a batch copied ahead on a side stream."""
        for t in (self.flip, self.rgb, self.images):
            if t is not None and t.is_cuda:
                t.record_stream(stream)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ShardBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return ShardBatch(move(self.flip), move(self.rgb), data=self.data, lengths=self.lengths,
                          boxes=self.boxes, images=move(self.images),
                          device=torch.device(device))


def collate_samples(batch: list[ShardSample], *, collate_fn_map: Any = None) -> ShardBatch:
    """The loader's collate for :class:`ShardSample` (registered with default_collate)."""
    flip = torch.tensor([s.flip for s in batch], dtype=torch.bool)
    rgb = None
    if any(s.rgb is not None for s in batch):
        rgb = torch.tensor([s.rgb or (0.0, 0.0, 0.0) for s in batch], dtype=torch.float32)
    if all(s.image is not None for s in batch):
        return ShardBatch(flip, rgb, images=torch.stack([s.image for s in batch]))
    return ShardBatch(flip, rgb, data=torch.cat([s.data for s in batch]),
                      lengths=[int(s.data.numel()) for s in batch], boxes=[s.box for s in batch])


# The loader's collate (alexnet_mp.loader.collate) is default_collate, which looks types up in
# this map; registering here keeps the loader unaware of shards. Worker processes import this
# module when they unpickle the data set, so the entry exists there too.
default_collate_fn_map[ShardSample] = collate_samples


def to_pixels(batch: ShardBatch) -> torch.Tensor:
    """Float images in [0, 1], N x 3 x H x W on the batch's device: decoded (when the batch holds
    bytes), cropped, mirrored and lit as each image's numbers say."""
    if batch.images is not None:
        x = batch.images
    else:
        files = list(torch.split(batch.data, batch.lengths))
        images = decode(files, batch.device)
        x = torch.stack([crop(img, box) for img, box in zip(images, batch.boxes)])
    x = x.float() / 255
    x = torch.where(batch.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if batch.rgb is not None:
        x = (x + batch.rgb.view(-1, 3, 1, 1)).clamp(0, 1)
    return x
