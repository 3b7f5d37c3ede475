"""Batch-level transforms for ``to_torch(transform=...)``: each takes the batch dict and returns it.

Use one directly (``transform=decode_image``) or configure it (``decode_image(size=(64, 64))`` returns a
picklable callable, so it also works in spawned workers). ``compose(a, b, ...)`` chains them.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def _configurable(fn):
    """Let ``fn(batch, **opts)`` also be called as ``fn(**opts)`` to get a configured transform."""

    @functools.wraps(fn)
    def wrapper(batch=None, **opts):
        if batch is None:
            return functools.partial(fn, **opts)
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

    n = min(_decode_threads() if threads is None else max(1, threads), max(1, (len(data) - 1) // 16))
    if n <= 1:
        decode_range(1, len(data))
    else:
        bounds = np.linspace(1, len(data), n + 1).astype(int)
        for f in [_pool(os.getpid()).submit(decode_range, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
            f.result()
    batch[out or column] = torch.from_numpy(dest)
    return batch


def _decode_threads() -> int:
    """The cores this process's share: a machine's cores split over the training processes on it
    (``LOCAL_WORLD_SIZE``) and, inside a DataLoader worker, over that loader's workers."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * (info.num_workers if info is not None else 1)
    return max(1, _available_cores() // procs)


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _pool(pid: int):  # one pool per process: a forked child must not inherit the parent's (dead) threads
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=_available_cores(), thread_name_prefix="tensorgrid-decode")


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
