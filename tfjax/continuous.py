"""Continuous (iteration-level) greedy decoding: sentences join and leave a running batch.

A whole-batch decoder call lasts as long as its longest translation, so every shorter one
waits, and a server's batch is mostly ended rows. Here the batch is a set of cache rows
stepped one token at a time from the host: after each step an ended row gives its sentence
back and the next waiting sentence takes the row (Orca's iteration-level scheduling). The
model's rolling cache makes that possible (`tfjax.model`: each row has its own age and reads
only what it wrote). The rows are a power of two at most `max_rows`, grown when sentences
wait and shrunk when few run, so one sentence alone steps one row.

Like the other decoders this never sees the model: `start` fills fresh rows for sentences
and `step` runs a few greedy steps of all rows (`generate.rolling_rows` / `rolling_steps`,
as `Translator.continuous` binds them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.decode import DecodeOutput

Cache = Any
# start(sentences) -> a rolling cache of fresh rows, at least one per sentence (ids [len]).
Start = Callable[[list[np.ndarray]], Cache]
# step(cache, last [rows], positions [rows], num_top, num_steps) -> (cache, record) of the
# num_steps steps that follow: tokens [rows, steps], token_log_probs [rows, steps], top_ids
# and top_probs [rows, steps, num_top] (`decode.greedy_steps`).
Step = Callable[[Cache, np.ndarray, np.ndarray, int, int], tuple[Cache, Any]]


def _rows(cache: Cache) -> int:
    """The number of rows: the leading size of its row leaves (scalars are shared)."""
    return next(x.shape[0] for x in jax.tree.leaves(cache) if x.ndim)


@jax.jit
def take_rows(cache: Cache, index: jax.Array) -> Cache:
    """A cache of len(index) rows: row i is row index[i], or zeros where index[i] is out of
    range (an empty row). Scalar leaves (the shared ring index) are kept."""
    return jax.tree.map(
        lambda x: jnp.take(x, index, axis=0, mode="fill", fill_value=0) if x.ndim else x, cache
    )


@functools.partial(jax.jit, static_argnums=1)
def empty_rows(like: Cache, rows: int) -> Cache:
    """A cache of `rows` empty rows shaped like the cache `like`. Jitted, so its arrays are
    placed as `put_rows`'s outputs are (one program each), and its scalars are new arrays,
    not `like`'s, which `put_rows` would donate."""
    return jax.tree.map(
        lambda x: jnp.zeros((rows, *x.shape[1:]), x.dtype) if x.ndim else x + 0, like
    )


@functools.partial(jax.jit, donate_argnums=0)
def put_rows(cache: Cache, fresh: Cache, slots: jax.Array) -> Cache:
    """`cache` with row slots[i] replaced by fresh row i; out-of-range slots are dropped (the
    fresh cache's padding rows). Scalar leaves are the running cache's."""
    return jax.tree.map(lambda x, y: x.at[slots].set(y, mode="drop") if x.ndim else x, cache, fresh)


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at limit."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


@dataclasses.dataclass
class _Row:
    """A sentence being decoded in a row."""

    tag: Hashable  # given back with its result
    limit: int  # tokens at most, eos included
    num_top: int  # alternatives recorded per step
    tokens: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    top_ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    top_probs: list[np.ndarray] = dataclasses.field(default_factory=list)

    def output(self) -> DecodeOutput:
        """What `greedy_search` gives for this sentence, batch 1, cut at its end."""
        n = len(self.tokens)
        tops = (np.stack(self.top_ids), np.stack(self.top_probs)) if n else (None, None)
        return DecodeOutput(
            tokens=np.asarray([self.tokens], np.int32),
            token_log_probs=np.asarray([self.log_probs], np.float32),
            lengths=np.asarray([n], np.int32),
            score=np.asarray([sum(self.log_probs)], np.float32),
            top_ids=tops[0][None, :, : self.num_top],
            top_probs=tops[1][None, :, : self.num_top],
        )


class ContinuousDecoder:
    """Greedy decoding over rows that sentences join and leave between steps."""

    def __init__(
        self, start: Start, step: Step, *, max_rows: int, max_decode_len: int, bos_id: int,
        eos_id: int, max_steps_per_call: int,
    ) -> None:  # fmt: skip
        """max_rows: rows at most (a power of two); max_decode_len: the cache's length L,
        the longest translation (eos included); bos_id, eos_id: the target's;
        max_steps_per_call: the steps one `step` call takes at one row; at r rows it takes
        max(1, max_steps_per_call // r)."""
        if max_rows < 1 or max_rows & (max_rows - 1):
            raise ValueError(f"max_rows={max_rows} must be a power of two")
        self._start, self._step = start, step
        self.max_rows, self.max_decode_len = max_rows, max_decode_len
        self.bos_id, self.eos_id = bos_id, eos_id
        self.max_steps_per_call = max_steps_per_call
        self._waiting: collections.deque[tuple[np.ndarray, _Row]] = collections.deque()
        self._rows: list[_Row | None] = []  # one per cache row; None: free
        self._cache: Cache = None
        self._last = np.zeros(0, np.int32)  # [rows] each row's previous token
        self.steps = 0  # model steps taken, for tests and metrics

    @property
    def running(self) -> int:
        """Sentences in rows."""
        return sum(row is not None for row in self._rows)

    @property
    def waiting(self) -> int:
        """Sentences added but not yet in a row."""
        return len(self._waiting)

    def add(self, ids: np.ndarray, tag: Hashable, *, limit: int, num_top: int = 0) -> None:
        """Queue a sentence (source ids [S], eos included) to decode up to `limit` tokens."""
        if not 1 <= limit <= self.max_decode_len:
            raise ValueError(f"limit={limit} must be in [1, {self.max_decode_len}]")
        self._waiting.append((ids, _Row(tag, limit, num_top)))

    def step(self) -> list[tuple[Hashable, DecodeOutput]]:
        """Fills free rows with waiting sentences, decodes a few tokens in every row (see
        `max_steps_per_call`), and returns the (tag, output) of the sentences that ended."""
        self._fit(min(self.running + self.waiting, self.max_rows))
        self._admit()
        if not self.running:
            return []
        # One host round trip costs about a one-row step: amortised over several at few rows.
        num_steps = max(1, self.max_steps_per_call // len(self._rows))
        positions = np.asarray([len(row.tokens) if row else 0 for row in self._rows], np.int32)
        # A power of two, so that few step programs compile; each row keeps its own.
        most = max(row.num_top for row in self._rows if row)
        num_top = bucket(most, 1 << 30) if most else 0
        self._cache, record = self._step(self._cache, self._last, positions, num_top, num_steps)
        self.steps += num_steps
        tokens, log_probs, top_ids, top_probs = jax.device_get(
            (record.tokens, record.token_log_probs, record.top_ids, record.top_probs)
        )  # [rows, num_steps, ...]
        self._last = tokens[:, -1].astype(np.int32)
        ended = []
        for r, row in enumerate(self._rows):
            for k in range(num_steps if row else 0):
                row.tokens.append(int(tokens[r, k]))
                row.log_probs.append(float(log_probs[r, k]))
                row.top_ids.append(top_ids[r, k])
                row.top_probs.append(top_probs[r, k])
                if tokens[r, k] == self.eos_id or len(row.tokens) == row.limit:
                    ended.append((row.tag, row.output()))
                    self._rows[r] = None
                    break
        return ended

    def drop(self) -> list[Hashable]:
        """Forgets every sentence, waiting or running (after a failed step); their tags."""
        tags = [row.tag for _, row in self._waiting] + [r.tag for r in self._rows if r]
        self._waiting.clear()
        self._rows, self._cache, self._last = [], None, np.zeros(0, np.int32)
        return tags

    def warm_up(self, sources: list[np.ndarray]) -> int:
        """Compiles every program a run can need, given one sentence per source length the
        start callback distinguishes: fresh rows of every size and length, joining rows of
        every size, steps and resizes; returns how many programs that is."""
        sizes = [1 << i for i in range(self.max_rows.bit_length())]
        fresh = {(n, len(x)): self._start([x] * n) for n in sizes for x in sources}
        programs = len(fresh)
        for size in sizes:
            # Fresh rows of any length are padded to one shape: one put_rows per count.
            cache = empty_rows(fresh[1, len(sources[0])], size)
            for n in sizes[: sizes.index(size) + 1]:
                cache = put_rows(cache, fresh[n, len(sources[0])], np.full(n, size, np.int32))
            programs += 1 + sizes.index(size) + 1
            zeros = np.zeros(size, np.int32)
            steps = max(1, self.max_steps_per_call // size)
            cache, _ = self._step(cache, zeros, zeros, 0, steps)
            for other in sizes:  # the sizes `_fit` may resize this one to
                if other > size or other <= size // 4:
                    take_rows(cache, np.zeros(other, np.int32))
                    programs += 1
            programs += 1
        return programs

    def _fit(self, needed: int) -> None:
        """Resizes the rows to hold `needed` sentences: grown to the power of two that does,
        shrunk (running rows first) only below a quarter, so sizes do not flap."""
        size, target = len(self._rows), bucket(max(needed, 1), self.max_rows)
        if size and size // 4 < target <= size:
            return
        keep = [r for r, row in enumerate(self._rows) if row is not None][:target]
        index = np.full(target, size, np.int32)  # size: out of range, an empty row
        index[: len(keep)] = keep
        if self._cache is not None:
            self._cache = take_rows(self._cache, index)
        self._rows = [self._rows[r] for r in keep] + [None] * (target - len(keep))
        self._last = np.concatenate([self._last[keep], np.zeros(target - len(keep), np.int32)])

    def _admit(self) -> None:
        """Moves waiting sentences into free rows, filled by one `start` call: as many as
        the largest power of two that free rows and waiting sentences allow, since `start`
        pads its sentences to a power of two and encoding a padding row cost about as much
        as a sentence, while a row left free until the next call costs one row-step."""
        free = [r for r, row in enumerate(self._rows) if row is None][: self.waiting]
        if not free:
            return
        free = free[: 1 << (len(free).bit_length() - 1)]
        taken = [self._waiting[i] for i in range(len(free))]
        fresh = self._start([ids for ids, _ in taken])  # should it fail, `drop` finds them
        for _ in free:
            self._waiting.popleft()
        if self._cache is None:  # the first rows
            self._cache = empty_rows(fresh, len(self._rows))
        slots = np.full(_rows(fresh), len(self._rows), np.int32)  # padding rows: dropped
        slots[: len(free)] = free
        self._cache = put_rows(self._cache, fresh, slots)
        for r, (_, row) in zip(free, taken, strict=True):
            self._rows[r] = row
            self._last[r] = self.bos_id
