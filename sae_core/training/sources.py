"""Where the trainer's batches come from: an activation source (SPEC §12).

Two kinds:

* :class:`InMemorySource` — a tensor [N, d] held in RAM (small runs, tests). Member j walks
  through its own permutation of the rows, redrawn every epoch from (seed_j, epoch)
  (:class:`BatchSampler`).
* :class:`ChunkedSource` — the rows live in chunks (Parquet row groups of the activation
  shards) read on demand. When every row fits in the shuffle buffer, it reads them once
  and behaves exactly as an :class:`InMemorySource` of the rows in file order — the same
  batches, bit for bit. Otherwise it streams through *windows*: each epoch the chunks are
  put in an order drawn from (seed_0, epoch) — seed_0 is the first member's seed, shared
  by every member of a batched module — and packed, in that order, into windows of at most
  ``buffer_rows`` rows; member j walks through window w in the order drawn from
  (seed_j, epoch, w). All members read the same window at the same time, so a J-member
  module reads the data once (the authors' members read one cached stream through
  different buffer shuffles). The batch of a step is a pure function of (seeds, step), so
  a run resumed from a checkpoint at step s reads from step s's window without replaying
  anything. The next window is read in a background thread while the current one trains;
  memory is about two windows, whatever the number of tokens.

A subset of ``max_rows`` rows (``max_train_tokens``, ``evaluate.max_tokens``) is drawn per
chunk without listing the whole split: the number kept in each chunk is a multivariate
hypergeometric draw, the rows within a chunk a seeded sample (:func:`subset_per_chunk`);
the in-memory path keeps the same rows.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

_INIT, _BATCHES, _BOOTSTRAP, _WINDOWS = 1, 2, 3, 4  # purposes, so the random streams never overlap


def seeded_generator(*words: int) -> torch.Generator:
    """A torch generator whose seed is derived from ``words`` by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_batch(n_rows: int, batch_size: int) -> None:
    if n_rows < batch_size:
        raise ValueError(
            f"only {n_rows} activation rows for batch_size={batch_size}: extract more tokens or lower batch_size"
        )


class BatchSampler:
    """Row indices of each member's batch at a given step: [J, B].

    Each member walks through its own permutation of the rows, redrawn every epoch;
    the last incomplete batch of an epoch is dropped. With ``bootstrap``, member j first
    draws N rows with replacement (from its seed) and walks through that resample instead.
    """

    def __init__(self, seeds: list[int], n_rows: int, batch_size: int, bootstrap: bool = False) -> None:
        _check_batch(n_rows, batch_size)
        self.seeds = seeds
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.batches_per_epoch = n_rows // batch_size
        self._epoch = -1
        self._perms: Tensor | None = None
        self.resample: Tensor | None = None
        if bootstrap:
            self.resample = torch.stack(
                [torch.randint(n_rows, (n_rows,), generator=seeded_generator(s, _BOOTSTRAP)) for s in seeds]
            )

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch or self._perms is None:
            self._perms = torch.stack(
                [torch.randperm(self.n_rows, generator=seeded_generator(s, _BATCHES, epoch)) for s in self.seeds]
            )
            self._epoch = epoch
        rows = self._perms[:, i * self.batch_size : (i + 1) * self.batch_size]
        return rows if self.resample is None else torch.gather(self.resample, 1, rows)


class BatchStream:
    """The batches of one training run: ``batch(step)`` -> [J, B, d] float32 on the CPU."""

    batches_per_epoch: int

    def batch(self, step: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Stop background reads (a stream is also usable as a context manager)."""

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActivationSource:
    """Rows of activations [N, d] the trainer and the metrics read (see the module docstring)."""

    d: int
    n_rows: int

    def fingerprint(self) -> str:
        """What a checkpoint or a saved model must match: the data and how batches are drawn from it."""
        raise NotImplementedError

    @property
    def streams(self) -> bool:
        """True when batches come through windows smaller than the data (memory bounded by the buffer)."""
        return False

    def init_sample(self, n: int) -> Tensor:
        """``n`` evenly spaced rows (of the whole data in memory; when streaming, of the first chunks
        in file order that hold n rows), for b_dec's initialisation."""
        raise NotImplementedError

    def stream(self, seeds: list[int], batch_size: int, *, bootstrap: bool = False) -> BatchStream:
        raise NotImplementedError

    def iter_batches(self, batch_size: int) -> Iterator[Tensor]:
        """Every row once, in file order, in batches of exactly ``batch_size`` (the last one shorter)."""
        raise NotImplementedError

    def in_memory(self) -> "InMemorySource":
        """Every row in RAM (a source that does not stream reads them once)."""
        raise NotImplementedError


def evenly_spaced(n_rows: int, n: int) -> Tensor:
    """The indices of ``min(n, n_rows)`` evenly spaced rows of ``n_rows``."""
    return torch.linspace(0, n_rows - 1, min(n, n_rows)).round().long()


class _SamplerStream(BatchStream):
    def __init__(self, rows: Tensor, seeds: list[int], batch_size: int, bootstrap: bool) -> None:
        self.rows, self.batch_size, self.J = rows, batch_size, len(seeds)
        self.sampler = BatchSampler(seeds, rows.shape[0], batch_size, bootstrap)
        self.batches_per_epoch = self.sampler.batches_per_epoch

    def batch(self, step: int) -> Tensor:
        return self.rows[self.sampler.indices(step).reshape(-1)].view(self.J, self.batch_size, -1)


class InMemorySource(ActivationSource):
    """A tensor [N, d] in RAM."""

    def __init__(self, rows: Tensor) -> None:
        if not isinstance(rows, Tensor) or rows.ndim != 2:
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"activations must be a 2-D tensor [tokens, d_in]; got {shape}")
        if not rows.is_floating_point():
            raise ValueError(f"activations must be floating point, got {rows.dtype}")
        self.rows = rows.float()
        self.n_rows, self.d = rows.shape

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(list(self.rows.shape)).encode())
        probe = self.rows[torch.linspace(0, self.n_rows - 1, min(self.n_rows, 64)).long()].float().contiguous()
        h.update(probe.cpu().numpy().tobytes())
        return h.hexdigest()

    def init_sample(self, n: int) -> Tensor:
        return self.rows[evenly_spaced(self.n_rows, n)]

    def stream(self, seeds: list[int], batch_size: int, *, bootstrap: bool = False) -> BatchStream:
        return _SamplerStream(self.rows, list(seeds), batch_size, bootstrap)

    def iter_batches(self, batch_size: int) -> Iterator[Tensor]:
        yield from self.rows.split(batch_size)

    def in_memory(self) -> "InMemorySource":
        return self


# ----------------------------------------------------------------------------- chunked


@dataclass(frozen=True)
class Chunk:
    """A block of rows read at once (a Parquet row group): ``key`` tells the reader where,
    ``rows`` how many it holds, ``keep`` which of them belong to the data (None: all)."""

    key: tuple
    rows: int
    keep: tuple[int, ...] | None = None

    @property
    def n(self) -> int:
        return self.rows if self.keep is None else len(self.keep)


#: reads chunks into a preallocated [Σ n, d] float32 array, in order
ChunkReader = Callable[[Sequence[Chunk], np.ndarray], None]


def subset_per_chunk(chunks: Sequence[Chunk], max_rows: int | None, seed: int) -> list[Chunk]:
    """``max_rows`` rows drawn uniformly without replacement from all chunks, as chunks with
    ``keep`` (row offsets, sorted); every chunk unchanged when max_rows is None or covers them.

    Counts per chunk: a multivariate hypergeometric draw from numpy's Generator(seed); rows
    within chunk c: the first count of a permutation from (seed, c). Memory: the kept offsets.
    """
    total = sum(c.rows for c in chunks)
    if max_rows is None or max_rows >= total:
        return list(chunks)
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = rng.multivariate_hypergeometric(np.array([c.rows for c in chunks], dtype=np.int64), max_rows, method="marginals")
    out = []
    for index, (chunk, count) in enumerate(zip(chunks, counts.tolist())):
        if count == 0:
            continue
        perm = torch.randperm(chunk.rows, generator=seeded_generator(seed, index))[:count]
        out.append(Chunk(chunk.key, chunk.rows, tuple(perm.sort().values.tolist())))
    return out


#: arrays at least this large get their own anonymous mapping (see :func:`window_array`)
MAPPED_BYTES = 64 << 20


def window_array(n: int, d: int) -> np.ndarray:
    """An [n, d] float32 array for a window's rows. A large one is an anonymous memory mapping of
    its own, unmapped when the array is freed: training turns glibc's mmap off
    (:func:`sae_core.training.memory.keep_freed_memory`) so step-sized tensors reuse their
    pages, and windows of varying sizes allocated and freed in turn (one of them by the
    prefetch thread) would otherwise fragment the heap it keeps, growing the process by a
    window or more."""
    nbytes = n * d * 4
    if nbytes < MAPPED_BYTES:
        return np.empty((n, d), dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32).reshape(n, d)


def windows_of(chunks: Sequence[Chunk], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Chunk indices packed, in ``order``, into windows of at most ``capacity`` rows (a chunk
    larger than the capacity gets a window of its own)."""
    windows: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for c in order:
        if current and rows + chunks[c].n > capacity:
            windows.append(current)
            current, rows = [], 0
        current.append(c)
        rows += chunks[c].n
    if current:
        windows.append(current)
    return windows


class ChunkedSource(ActivationSource):
    """Rows in chunks read on demand through ``reader``; see the module docstring.

    identity: names the data (e.g. the shards' checksums), for fingerprints.
    buffer_rows: rows the shuffle buffer holds (one window); at least every row means one read, in memory.
    """

    def __init__(self, chunks: Sequence[Chunk], reader: ChunkReader, d: int, identity: str, buffer_rows: int) -> None:
        self.chunks = [c for c in chunks if c.n > 0]
        if not self.chunks:
            raise ValueError("the activation source holds no rows")
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        self.reader, self.d, self.identity, self.buffer_rows = reader, d, identity, buffer_rows
        self.n_rows = sum(c.n for c in self.chunks)
        self._memory: InMemorySource | None = None

    @property
    def streams(self) -> bool:
        return self.n_rows > self.buffer_rows

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """The rows of chunks ``indices`` (in that order) as one [n, d] float32 array."""
        out = window_array(sum(self.chunks[i].n for i in indices), self.d)
        self.reader([self.chunks[i] for i in indices], out)
        return out

    def in_memory(self) -> InMemorySource:
        """Every row in file order, read once (the path taken when they fit in the buffer)."""
        if self._memory is None:
            self._memory = InMemorySource(torch.from_numpy(self.read(range(len(self.chunks)))))
        return self._memory

    def fingerprint(self) -> str:
        how = f"windows of {self.buffer_rows} rows" if self.streams else "in memory"
        return hashlib.sha256(f"{self.identity}|{self.n_rows}|{how}".encode()).hexdigest()

    def init_sample(self, n: int) -> Tensor:
        if not self.streams:
            return self.in_memory().init_sample(n)
        # the first chunks (file order) that hold n rows: one 16 MB row group for the default 8,192
        first, rows_in = [], 0
        for i, chunk in enumerate(self.chunks):
            if rows_in >= n:
                break
            first.append(i)
            rows_in += chunk.n
        rows = torch.from_numpy(self.read(first))
        return rows[evenly_spaced(rows.shape[0], n)]

    def stream(self, seeds: list[int], batch_size: int, *, bootstrap: bool = False) -> BatchStream:
        if not self.streams:
            return self.in_memory().stream(seeds, batch_size, bootstrap=bootstrap)
        if bootstrap:
            raise ValueError(
                f"bootstrap resamples the whole split, which streaming does not hold ({self.n_rows:,} rows > a shuffle "
                f"buffer of {self.buffer_rows:,}): set train.activations: memory, or raise train.shuffle_buffer_mb"
            )
        return _WindowStream(self, list(seeds), batch_size)

    def iter_batches(self, batch_size: int) -> Iterator[Tensor]:
        """Chunk by chunk (never more than a chunk and a batch in memory), cut at the same
        boundaries as the in-memory ``rows.split(batch_size)``."""
        carry: Tensor | None = None
        for i in range(len(self.chunks)):
            block = torch.from_numpy(self.read([i]))
            rows = block if carry is None else torch.cat([carry, block])
            full = rows.shape[0] // batch_size * batch_size
            yield from rows[:full].split(batch_size)
            carry = rows[full:] if full < rows.shape[0] else None
        if carry is not None:
            yield carry


class _WindowStream(BatchStream):
    """Batches through windows of a :class:`ChunkedSource`, the next window prefetched in a thread."""

    def __init__(self, source: ChunkedSource, seeds: list[int], batch_size: int) -> None:
        _check_batch(source.n_rows, batch_size)
        self.source, self.seeds, self.B = source, seeds, batch_size
        self.batches_per_epoch = source.n_rows // batch_size
        self._plans: dict[int, tuple[list[list[int]], np.ndarray]] = {}
        self._loaded: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (epoch, window) -> rows, perms [J, n]
        self._pending: dict[tuple[int, int], Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-prefetch")

    def _plan(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """The epoch's windows (chunk indices) and the stream offset where each starts."""
        if epoch not in self._plans:
            order = torch.randperm(len(self.source.chunks), generator=seeded_generator(self.seeds[0], _WINDOWS, epoch))
            windows = windows_of(self.source.chunks, order.tolist(), self.source.buffer_rows)
            sizes = [sum(self.source.chunks[c].n for c in w) for w in windows]
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = (windows, np.concatenate([[0], np.cumsum(sizes)]))
        return self._plans[epoch]

    def _load(self, epoch: int, w: int) -> tuple[Tensor, Tensor]:
        windows, _ = self._plan(epoch)
        rows = torch.from_numpy(self.source.read(windows[w]))
        perms = torch.stack([torch.randperm(rows.shape[0], generator=seeded_generator(s, _BATCHES, epoch, w)) for s in self.seeds])
        return rows, perms

    def _window(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if key not in self._loaded:
            future = self._pending.pop(key, None)
            self._loaded[key] = future.result() if future is not None else self._load(*key)
        return self._loaded[key]

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, w = key
        windows, _ = self._plan(epoch)
        return (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)

    def batch(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        windows, starts = self._plan(epoch)
        lo, hi = i * self.B, (i + 1) * self.B
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        keys = [(epoch, w) for w in range(first, last + 1)]
        parts = []
        for key in keys:
            rows, perms = self._window(key)
            a, b = max(lo, int(starts[key[1]])), min(hi, int(starts[key[1] + 1]))
            local = perms[:, a - int(starts[key[1]]) : b - int(starts[key[1]])]  # [J, b - a]
            parts.append(rows[local.reshape(-1)].view(len(self.seeds), b - a, -1))
        # keep only what this and later steps need, and read the next window meanwhile
        self._loaded = {k: v for k, v in self._loaded.items() if k >= keys[-1] or k in keys}
        upcoming = self._next_key(keys[-1])
        self._plan(upcoming[0])  # planned here, so the reading thread only looks plans up
        if upcoming not in self._loaded and upcoming not in self._pending:
            self._pending = {k: f for k, f in self._pending.items() if k >= keys[-1]}
            self._pending[upcoming] = self._pool.submit(self._load, *upcoming)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._loaded.clear()
        self._pool.shutdown(wait=True)


def as_source(activations: Tensor | ActivationSource) -> ActivationSource:
    """An activation source for a tensor (held in memory) or a source as is."""
    return activations if isinstance(activations, ActivationSource) else InMemorySource(activations)
