"""Reused memory for gathers: a window's output block and its scratch copies, without fresh pages.

A shuffled window gathers tens of MB into a fresh array; glibc serves blocks that big (above its 32 MiB
mmap ceiling) with a new ``mmap`` each time, so every window paid a page fault and the kernel's zeroing
for each 4 KiB it wrote (28x28 images: ``clear_page`` was 14% of an epoch's time under ``perf``). A pool
keeps the blocks it handed out and hands one out again once nothing refers to it any more: batches are
views of their chunk's block (torch tensors made with ``from_numpy`` hold the numpy array, whose ``base`` is
the block), so a block is free when the pool holds its only reference. A user who keeps a batch keeps its
block: the pool then makes a new one, never writes into memory a batch still shows.
"""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20  # smaller arrays: malloc reuses its own free lists, nothing to gain
HEAP_BYTES = 32 << 20  # glibc serves blocks up to this from its heap (when its threshold is raised)


def _new_block(nbytes: int) -> np.ndarray:
    """A block below HEAP_BYTES gets a mapping of its own, outside malloc's heap: kept for reuse, it would
    pin the heap and let freed memory below it pile up (RSS grew ~75 MB over ten epochs in a long-lived
    process whose thresholds were raised); dropped, it goes back to the kernel. Bigger ones come from
    malloc, which maps them anyway (measured 10-30% faster gathers into them than into Python's mmap)."""
    if nbytes >= HEAP_BYTES:
        return np.empty(nbytes, np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


class BufferPool:
    """Arrays for gathers, reused once unreferenced; at most ``max_bytes`` held (free blocks dropped first,
    oldest first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._blocks: list[np.ndarray] = []  # uint8 owners, most recently handed out last
        self._lock = threading.Lock()
        self.reused = self.made = 0

    def __getstate__(self):  # a worker process starts with its own (empty) pool
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``: a view of a free block when one fits."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in (shape if isinstance(shape, tuple) else (shape,)))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            block = self._take(nbytes)
            if block is None:
                self._make_room(nbytes)
                block = _new_block(nbytes)
                self.made += 1
            else:
                self.reused += 1
            self._blocks.append(block)
        return block[:nbytes].view(dtype).reshape(shape)

    @staticmethod
    def _free(block: np.ndarray) -> bool:
        # references: the pool's list, this function's argument, getrefcount's own argument
        return sys.getrefcount(block) <= 3

    def _take(self, nbytes: int) -> np.ndarray | None:
        # the smallest free block that holds nbytes without wasting more than half of it
        best = None
        for i in range(len(self._blocks)):
            size = self._blocks[i].nbytes
            if nbytes <= size <= 2 * nbytes and (best is None or size < self._blocks[best].nbytes) \
                    and self._free(self._blocks[i]):
                best = i
        return None if best is None else self._blocks.pop(best)

    def _make_room(self, nbytes: int) -> None:
        held = sum(b.nbytes for b in self._blocks)
        i = 0
        while held + nbytes > self.max_bytes and i < len(self._blocks):
            if self._free(self._blocks[i]):
                held -= self._blocks.pop(i).nbytes
            else:
                i += 1
