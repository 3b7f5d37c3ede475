"""Batch-level transforms for ``to_torch(transform=...)``: each takes the batch dict and returns it.

Use one directly (``transform=decode_image``) or configure it (``decode_image(size=(64, 64))`` returns a
picklable callable, so it also works in spawned workers). ``compose(a, b, ...)`` chains them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from . import cores


def _configurable(fn):
    """Let ``fn(batch, **opts)`` also be called as ``fn(**opts)`` to get a configured transform."""

    @functools.wraps(fn)
    def wrapper(batch=None, **opts):
        if batch is None:
            return functools.partial(fn, **opts)
        if not isinstance(batch, dict):
            raise TypeError(f"{wrapper.__name__}() takes a batch dict, or keyword options to configure it "
                            f"(e.g. {wrapper.__name__}(column='image')); got {type(batch).__name__} {batch!r}"[:300])
        return fn(batch, **opts)

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__.lstrip("_")  # pickled by its public name
    return wrapper


def _decode_one(data: bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if size is not None and im.format == "JPEG":
            im.draft(mode, (size[1], size[0]))  # let libjpeg decode at a reduced scale when it can
        if im.mode != mode:
            im = im.convert(mode)
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def _decode_image(batch: dict, column: str = "image", mode: str = "RGB", size: tuple[int, int] | None = None,
                  channels_first: bool = True, out: str | None = None, threads: int | None = None) -> dict:
    """JPEG/PNG bytes -> uint8 tensor (N, C, H, W) (or (N, H, W, C)), decoded with Pillow. Images of
    different sizes need ``size=(height, width)``.

    Pillow releases the GIL while it decodes, so a batch is split over ``threads`` threads: by default
    this process's share of the cores (all of them in the main process; cores / num_workers inside
    DataLoader workers)."""
    data = batch[column]
    if not data:
        batch[out or column] = torch.empty((0,), dtype=torch.uint8)
        return batch
    first = _decode_one(data[0], mode, size)
    h, w, c = first.shape
    dest = np.empty((len(data), c, h, w) if channels_first else (len(data), h, w, c), dtype=np.uint8)
    dest[0] = first.transpose(2, 0, 1) if channels_first else first

    def decode_range(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = _decode_one(data[i], mode, size)
            if a.shape != first.shape:
                raise ValueError(f"images in column {column!r} have different sizes ({first.shape[:2]} and "
                                 f"{a.shape[:2]}); pass size=(height, width)")
            dest[i] = a.transpose(2, 0, 1) if channels_first else a  # one copy, straight into the batch

    n = min(cores.share() if threads is None else max(1, threads), max(1, (len(data) - 1) // 16))
    cores.run_split(lambda lo, hi: decode_range(lo + 1, hi + 1), len(data) - 1, n)
    batch[out or column] = torch.from_numpy(dest)
    return batch


def _resize(batch: dict, size: tuple[int, int], column: str = "image", antialias: bool = True) -> dict:
    """Resize an (N, C, H, W) image tensor to ``size=(height, width)`` (bilinear); keeps the dtype."""
    x = batch[column]
    y = torch.nn.functional.interpolate(x.float(), size=tuple(size), mode="bilinear", antialias=antialias,
                                        align_corners=False)
    batch[column] = y.round_().clamp_(0, 255).to(x.dtype) if not x.is_floating_point() else y.to(x.dtype)
    return batch


def _to_float(batch: dict, column: str = "image", scale: float | None = None) -> dict:
    """Integer tensor -> float32; uint8 is scaled to [0, 1] unless ``scale`` is given."""
    x = batch[column]
    if scale is None:
        scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    batch[column] = x.to(torch.float32).mul_(scale) if x.dtype != torch.float32 else x * scale
    return batch


def _normalize(batch: dict, mean: Sequence[float], std: Sequence[float], column: str = "image") -> dict:
    """(x - mean) / std per channel of an (N, C, ...) float tensor (uint8 is first scaled to [0, 1])."""
    x = batch[column]
    if not x.is_floating_point():
        x = x.to(torch.float32) / 255
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = torch.as_tensor(mean, dtype=x.dtype).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype).reshape(shape)
    batch[column] = (x - m) / s
    return batch


decode_image = _configurable(_decode_image)
resize = _configurable(_resize)
to_float = _configurable(_to_float)
normalize = _configurable(_normalize)


class compose:  # noqa: N801 - reads like the function it is
    """Chain batch transforms left to right (picklable when its parts are)."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, batch: dict) -> dict:
        for t in self.transforms:
            batch = t(batch)
        return batch
