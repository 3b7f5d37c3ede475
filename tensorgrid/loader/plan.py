"""The epoch plan: which rows each rank gets, batch by batch, as a pure function of
(dataset layout, seed, epoch, batch size, world size). No I/O, no state: workers, resumed runs and other
ranks recompute exactly the same plan.

Order. Blocks (the data's own: Parquet row groups, slices of a table; never the cache's, so the order is
the same with the cache on, off, half filled or evicted) are permuted with a seeded RNG. The permuted blocks
are taken in spans of about ``span_rows`` rows (what the memory budget lets a process keep decoded); inside
a span every block is cut into pieces of ``piece_rows`` and the span's pieces are permuted, giving the
sequence rho of all rows. rho is cut into windows of S rows (S a multiple of the global batch G = world_size
* batch_size); the rows of each window are permuted (the shuffle buffer, bounded in rows and so in bytes).
The result is the epoch order pi. Pieces are small enough that each window draws about ``PIECES_PER_BLOCK``
pieces from every block of its span: the first rows of an epoch come from nearly every block of the span
(whole blocks per window would give a window only S / block_rows of them). Without shuffle pi is storage
order. ``span_rows=None`` is the order of TensorGrid before pieces (whole blocks): states saved then resume
in it.

Partition. Global batch k is pi[k*G : (k+1)*G]; rank r takes its r-th equal slice. So every rank gets the
same number of batches, and the set of rows in each global batch depends on G only, not on how it is
split: a run can resume with another world size as long as G is unchanged. Unless drop_last, the epoch is
padded to a multiple of world_size by repeating its first rows (fewer than world_size rows, flagged as
padding); with drop_last the last partial global batch is dropped (fewer than G rows).

Locality (``pad_batches``): a rank reads only its own share (the partitions on its node) as a plan of world
size 1 over that share, padded with its repeated rows to the batch count every rank has (``pad_batches``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..args import check_int

PIECES_PER_BLOCK = 5  # per window, on average: a block is missing from a window with probability ~e^-5


@dataclass(frozen=True)
class Layout:
    """Rows per shard and the blocks (shard, start, stop) they are read in, in storage order."""

    shard_rows: tuple[int, ...]
    blocks: tuple[tuple[int, int, int], ...]

    @cached_property
    def shard_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])

    @cached_property
    def block_array(self) -> np.ndarray:
        return np.asarray(self.blocks, dtype=np.int64).reshape(-1, 3)

    @cached_property
    def digest(self) -> str:
        """A short fingerprint of the blocks (orders built on other blocks differ)."""
        import hashlib

        return hashlib.blake2b(np.ascontiguousarray(self.block_array).tobytes(), digest_size=8).hexdigest()

    @cached_property
    def block_gstart(self) -> np.ndarray:
        """Global row id of each block's first row."""
        b = self.block_array
        return self.shard_starts[b[:, 0]] + b[:, 1]

    @property
    def num_rows(self) -> int:
        return int(self.shard_starts[-1])

    def locate(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids -> (shard, row within shard)."""
        shard = np.searchsorted(self.shard_starts, gids, side="right") - 1
        return shard, gids - self.shard_starts[shard]

    def block_of(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_gstart, gids, side="right") - 1


@dataclass
class Plan:
    layout: Layout
    batch_size: int
    world_size: int = 1
    rank: int = 0
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False
    window_rows: int = 1 << 16
    max_chunk_batches: int | None = None  # batches per chunk at most; default a whole window
    span_rows: int | None = None  # rows of permuted blocks whose pieces are interleaved (None: whole blocks)
    ramp: bool = True  # the first window's chunks grow 1, 2, 4, ... batches (off: its first batch is cheap anyway)
    pad_batches: int | None = None  # locality: this rank's own rows only (world_size 1), padded to this many batches
    _sigma: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.world_size = check_int("world_size", self.world_size, 1)
        self.rank = check_int("rank", self.rank, 0, self.world_size - 1)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @cached_property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @cached_property
    def padded_rows(self) -> int:
        """Rows in the epoch after padding (or dropping) so every rank gets equal batches."""
        n, g, w = self.num_rows, self.global_batch, self.world_size
        if self.pad_batches is not None:  # every rank as many batches: the last ones padding when it has fewer rows
            full = self.pad_batches * g
            return full if self.drop_last or n <= full - g else n
        if self.drop_last:
            return (n // g) * g
        return -(-n // w) * w if n else 0

    @cached_property
    def num_batches(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return -(-self.padded_rows // self.global_batch)

    @cached_property
    def window(self) -> int:
        """Rows per shuffle window: a multiple of the global batch."""
        g = self.global_batch
        return max(1, -(-self.window_rows // g)) * g

    @property
    def batches_per_window(self) -> int:
        return self.window // self.global_batch

    @property
    def batches_per_chunk(self) -> int:
        """A chunk (the unit a worker builds) is a whole window, or part of one (``max_chunk_batches``)."""
        return min(self.max_chunk_batches or self.batches_per_window, self.batches_per_window)

    @cached_property
    def _chunk_starts(self) -> list[int]:
        """Where each chunk of the epoch's first window starts (batch offsets in it). Its first chunks ramp up
        (1, 2, 4, ... batches, up to ``batches_per_chunk``): the epoch's first batch waits for one batch's
        gather, not a whole window's. Later windows are cut in whole chunks (``batches_per_chunk``): a chunk
        that is a small part of its window is gathered table by table with a scatter to its positions (one
        more copy of every row), which made a ramp in every window cost a third of a shuffled epoch of
        28x28 images (measured). Without ``ramp`` (every row in the Arrow cache: a whole window is one
        gather of memory-mapped rows, ~20 ms for 64 MB here) the first window is cut like the others. Chunks
        only group batches: the order never depends on them."""
        wb, bpc = self.batches_per_window, self.batches_per_chunk
        starts, at, size = [], 0, 1 if self.ramp else bpc
        while at < wb:
            starts.append(at)
            at += min(size, bpc)
            size *= 2
        return starts

    @property
    def _later_chunks_per_window(self) -> int:
        return -(-self.batches_per_window // self.batches_per_chunk)

    @property
    def num_chunks(self) -> int:
        return self.chunk_of(self.num_batches - 1) + 1 if self.num_batches else 0

    def window_range(self, j: int) -> tuple[int, int]:
        """Epoch (and rho) positions of window j."""
        return j * self.window, min((j + 1) * self.window, self.num_rows)

    # --- order ------------------------------------------------------------------------------------
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, *keys])

    @cached_property
    def _rho(self) -> tuple[np.ndarray, np.ndarray]:
        """The row ranges (shard, start, stop) rho is made of, in rho order, and where each starts in rho."""
        b = self.layout.block_array
        order = self._rng(0).permutation(len(b)) if self.shuffle else np.arange(len(b))
        pieces = b[order]
        if self.shuffle and self.span_rows is not None and len(b) > 1:
            pieces = np.concatenate([self._span_pieces(pieces[lo:hi], k) for k, (lo, hi) in
                                     enumerate(self._spans(pieces[:, 2] - pieces[:, 1]))])
        sizes = pieces[:, 2] - pieces[:, 1]
        return pieces, np.concatenate([[0], np.cumsum(sizes)])

    def _spans(self, sizes: np.ndarray) -> list[tuple[int, int]]:
        """Consecutive runs of the permuted blocks holding about ``span_rows`` rows each (whole blocks)."""
        ends = np.cumsum(sizes)
        cuts = np.searchsorted(ends, np.arange(1, -(-int(ends[-1]) // self.span_rows)) * self.span_rows, side="left")
        bounds = sorted({0, len(sizes), *(int(c) + 1 for c in cuts if c + 1 < len(sizes))})
        return list(zip(bounds[:-1], bounds[1:]))

    def _span_pieces(self, blocks: np.ndarray, k: int) -> np.ndarray:
        """A span's blocks cut into pieces, the pieces permuted: each window then draws about
        PIECES_PER_BLOCK pieces of every block of the span."""
        sizes = blocks[:, 2] - blocks[:, 1]
        piece = max(1, -(-int(self.window) // (PIECES_PER_BLOCK * len(blocks))))
        counts = -(-sizes // piece)
        owner = np.repeat(np.arange(len(blocks)), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        starts = blocks[owner, 1] + (np.arange(len(owner)) - first[owner]) * piece
        stops = np.minimum(starts + piece, blocks[owner, 2])
        cut = np.stack([blocks[owner, 0], starts, stops], axis=1)
        return cut[self._rng(2, k).permutation(len(cut))]

    def _window_perm(self, j: int) -> np.ndarray:
        if j not in self._sigma:
            n = min(self.window, self.num_rows - j * self.window)
            if len(self._sigma) > 4:
                self._sigma.clear()
            self._sigma[j] = self._rng(1, j).permutation(n) if self.shuffle else None
        return self._sigma[j]

    def rows_at(self, pos: np.ndarray) -> np.ndarray:
        """Epoch positions -> global row ids (positions past the data wrap around: padding)."""
        pos = np.asarray(pos, dtype=np.int64)
        if self.num_rows == 0:
            return pos
        pos = pos % self.num_rows
        if self.shuffle:
            rho_pos = np.empty_like(pos)
            win = pos // self.window
            for j in np.unique(win):
                sel = win == j
                rho_pos[sel] = j * self.window + self._window_perm(int(j))[pos[sel] - j * self.window]
        else:
            rho_pos = pos
        pieces, starts = self._rho
        bi = np.searchsorted(starts, rho_pos, side="right") - 1
        return self.layout.shard_starts[pieces[bi, 0]] + pieces[bi, 1] + (rho_pos - starts[bi])

    # --- partition --------------------------------------------------------------------------------
    def batch_positions(self, k: int) -> np.ndarray:
        """Epoch positions of this rank's batch k."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range [0, {self.num_batches})")
        g = self.global_batch
        m = min(g, self.padded_rows - k * g)
        per = m // self.world_size
        start = k * g + self.rank * per
        return np.arange(start, start + per, dtype=np.int64)

    def positions(self, ks: range) -> tuple[np.ndarray, list[int]]:
        """Epoch positions of this rank's batches ``ks`` (consecutive), concatenated, and batch bounds."""
        if not len(ks):
            return np.empty(0, np.int64), [0]
        g = self.global_batch
        full = [k for k in ks if (k + 1) * g <= self.padded_rows]
        pos = np.empty(0, np.int64)
        if full:  # all full global batches at once: start of this rank's slice + 0..batch_size-1
            starts = np.asarray(full, dtype=np.int64) * g + self.rank * self.batch_size
            pos = (starts[:, None] + np.arange(self.batch_size, dtype=np.int64)[None, :]).reshape(-1)
        sizes = [self.batch_size] * len(full)
        for k in ks[len(full):]:  # the last, shorter global batch
            extra = self.batch_positions(k)
            pos = np.concatenate([pos, extra])
            sizes.append(len(extra))
        return pos, np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()

    def chunk_batches(self, c: int, first: int = 0) -> range:
        """Batch indices of chunk c (never crossing a window), starting no earlier than ``first``."""
        wb, starts, bpc = self.batches_per_window, self._chunk_starts, self.batches_per_chunk
        if c < len(starts):
            lo, hi = starts[c], (starts[c + 1] if c + 1 < len(starts) else wb)
        else:
            w, i = divmod(c - len(starts), self._later_chunks_per_window)
            lo = (w + 1) * wb + i * bpc
            hi = min(lo + bpc, (w + 2) * wb)
        return range(max(lo, first), min(hi, self.num_batches))

    def chunk_of(self, k: int) -> int:
        w, r = divmod(k, self.batches_per_window)
        if w == 0:
            return bisect.bisect_right(self._chunk_starts, r) - 1
        return len(self._chunk_starts) + (w - 1) * self._later_chunks_per_window + r // self.batches_per_chunk

    def segments(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """rho positions [a, b) as row ranges (shard, start, stop), adjacent ranges of a shard merged."""
        pieces, starts = self._rho
        out: list[list[int]] = []
        i = int(np.searchsorted(starts, a, side="right")) - 1
        while i < len(pieces) and starts[i] < b:
            shard, s0, _ = pieces[i]
            lo = s0 + max(0, a - starts[i])
            hi = s0 + min(starts[i + 1], b) - starts[i]
            if out and out[-1][0] == shard and out[-1][2] == lo:
                out[-1][2] = int(hi)
            else:
                out.append([int(shard), int(lo), int(hi)])
            i += 1
        return [tuple(x) for x in out]

    def window_local(self, pos: np.ndarray) -> tuple[int, np.ndarray]:
        """Positions inside one window -> (window, index among the window's rows in rho order)."""
        j = int(pos[0]) // self.window
        q = pos - j * self.window
        return j, (self._window_perm(j)[q] if self.shuffle else q)
