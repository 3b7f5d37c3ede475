"""Batch-level transforms for ``to_torch(transform=...)``: each takes the batch dict and returns it.

Use one directly (``transform=decode_image``) or configure it (``decode_image(size=(64, 64))`` returns a
picklable callable, so it also works in spawned workers). ``compose(a, b, ...)`` chains them. Random
transforms (``random_crop``, ``horizontal_flip``) draw from a stream the loader gives each batch (seed, epoch,
rank, batch number: ``rng.batch_keys``), so the same seed gives the same crops with any number of workers;
called outside a loader they draw from torch's global generator.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from . import cores, rng


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


def _resize(batch: dict, size: int | tuple[int, int], column: str = "image", antialias: bool = True) -> dict:
    """Resize an (N, C, H, W) image tensor to ``size=(height, width)``, or with ``size=s`` (an int) so that
    its shorter side is ``s`` and the aspect ratio is kept (bilinear); keeps the dtype."""
    x = batch[column]
    _check_images(x, column, "resize")
    if isinstance(size, int) and not isinstance(size, bool):
        h, w = x.shape[-2:]
        size = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
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


def _check_images(x, column: str, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"{what} takes an (N, C, H, W) image tensor in column {column!r}, got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}: decode the images first")


def _crop_size(x, size, column: str, what: str) -> tuple[int, int]:
    _check_images(x, column, what)
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if not (0 < th <= h and 0 < tw <= w):
        raise ValueError(f"{what}: cannot cut {th}x{tw} out of {h}x{w} images in column {column!r} "
                         f"(resize them first)")
    return th, tw


def _center_crop(batch: dict, size: int | tuple[int, int], column: str = "image") -> dict:
    """The central ``size=(height, width)`` (or ``size=s``: s x s) of every image of an (N, C, H, W) tensor."""
    x = batch[column]
    th, tw = _crop_size(x, size, column, "center_crop")
    top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
    batch[column] = x[..., top:top + th, left:left + tw].contiguous()
    return batch


def _random_crop(batch: dict, size: int | tuple[int, int], column: str = "image") -> dict:
    """A ``size`` window at a random place of each image (its own place per image). Under the loader the
    places depend on (seed, epoch, rank, batch) only: the same for any number of workers and after resume."""
    x = batch[column]
    th, tw = _crop_size(x, size, column, "random_crop")
    n, (h, w) = x.shape[0], x.shape[-2:]
    g = rng.generator()
    tops = torch.randint(0, h - th + 1, (n,), generator=g)
    lefts = torch.randint(0, w - tw + 1, (n,), generator=g)
    flat = x.reshape(n, -1, h, w)  # every channel (and any other middle axis) cut at its image's place
    rows = (tops[:, None] + torch.arange(th))[:, None, :, None]
    cols = (lefts[:, None] + torch.arange(tw))[:, None, None, :]
    out = flat[torch.arange(n)[:, None, None, None], torch.arange(flat.shape[1])[None, :, None, None], rows, cols]
    batch[column] = out.reshape(x.shape[:-2] + (th, tw))  # one indexing pass, no loop over images
    return batch


def _horizontal_flip(batch: dict, p: float = 0.5, column: str = "image") -> dict:
    """Mirror each image left-right with probability ``p`` (drawn per image, like ``random_crop``)."""
    x = batch[column]
    _check_images(x, column, "horizontal_flip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"horizontal_flip: p must be in [0, 1], got {p}")
    flip = torch.rand(x.shape[0], generator=rng.generator()) < p
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    batch[column] = x
    return batch


decode_image = _configurable(_decode_image)
center_crop = _configurable(_center_crop)
random_crop = _configurable(_random_crop)
horizontal_flip = _configurable(_horizontal_flip)
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
