"""Tokenized examples -> fixed-shape batches (first-fit packing or one per row), checkpointable.

The stage after reading: its parent yields chunks (lists) of examples, each a dict of
variable-length int32 ids per side (eos included; see `pipeline`) and, for classification, a
scalar "label". Every batch holds `rows` rows; the arrays it makes are those of
`pipeline.train_batch_shapes`, with decoder_inputs written beside each placed target (bos,
then the target shifted right, inside its own segment).

Packing is first fit, as grain's FirstFitPackIterDataset without bin shuffling: each example
goes to the first row with room on every side; when one fits no row the batch is emitted and
that example starts the next. Choosing each example's place is Python (a first-fit scan
over the rows); the arrays are then written in one pass per array when the batch is emitted.

`padded_rows` fills one batch the same way, one example per row, for evaluation.

The iterator's state is (the parent's state before the current chunk, the position in that
chunk of the next example no emitted batch holds): restoring it re-reads one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from tfjax.data.tokenizer import BOS_ID

Example = dict[str, Any]  # {"inputs": ids [n], "targets": ids [m]} (+ "label": int)


class PipelineStateError(ValueError):
    """A saved data position this pipeline cannot resume from (another version wrote it)."""


class PackedBatches(grain.IterDataset):
    """Chunks [[example, ...], ...] -> batches of `rows` rows, packed or one example per row."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        rows: int,
        lengths: dict[str, int],
        pack: bool,
        limit: Callable[[list[Example]], list[Example]],
    ):
        """lengths: row length per side, e.g. {"inputs": S, "targets": T}; limit: drops or
        truncates a chunk's over-long examples (every example it returns fits a row)."""
        super().__init__(parent)
        self._layout = dict(rows=rows, lengths=dict(lengths), pack=pack)
        self._limit = limit

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self._parent.__iter__(), self._layout, self._limit)

    def __str__(self) -> str:
        return f"PackedBatches({self._layout})"


class _PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, layout: dict, limit: Callable):
        super().__init__(parent)
        self._layout = layout
        self._limit = limit
        self._chunk: list[Example] = []
        self._next = 0  # position in _chunk of the next example not yet in an emitted batch
        self._chunk_state = parent.get_state()  # the parent's state before _chunk was read

    def __next__(self) -> dict[str, np.ndarray]:
        rows = _Rows(**self._layout)
        while True:
            if self._next == len(self._chunk):
                state = self._parent.get_state()
                try:
                    chunk = next(self._parent)
                except StopIteration:
                    if rows.empty:
                        raise
                    return rows.arrays  # A finite run's last batch: all-pad rows fill it.
                self._chunk, self._next, self._chunk_state = self._limit(chunk), 0, state
                continue
            if not rows.add(self._chunk[self._next]):
                return rows.arrays  # The example that did not fit starts the next batch.
            self._next += 1

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._chunk_state, "next": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"parent", "next"}:  # Checked before anything is changed.
            raise PipelineStateError(f"a data position of another pipeline version: {state}")
        self._parent.set_state(state["parent"])
        self._chunk_state = state["parent"]
        try:
            self._chunk = self._limit(next(self._parent))
        except StopIteration:
            self._chunk = []
        self._next = state["next"]


def padded_rows(
    examples: list[Example], rows: int, lengths: dict[str, int]
) -> dict[str, np.ndarray]:
    """Up to `rows` examples, one per row, as an unpacked batch (0 on padding, label -1 on
    empty rows): what evaluation batches are."""
    batch = _Rows(rows, lengths, pack=False)
    for example in examples:
        if not batch.add(example):
            raise ValueError(f"more than {rows} examples for {rows} rows")
    return batch.arrays


class _Rows:
    """One batch being filled: where each example goes, and each row's free room per side.

    `add` only chooses the place; `arrays` writes every placed example at once, a few numpy
    calls per array instead of a slice copy per example and array (about ten an example).
    """

    def __init__(self, rows: int, lengths: dict[str, int], pack: bool):
        self.rows, self.pack, self.lengths = rows, pack, dict(lengths)
        self.free = [[n] * rows for n in self.lengths.values()]  # [sides][rows] room left
        self.used = 0  # rows holding at least one example
        self.segments = [0] * rows  # examples per row so far
        self.placed: list[tuple[int, int, list[int], Example]] = []  # (row, segment, starts, ex)

    @property
    def empty(self) -> bool:
        return self.used == 0

    def add(self, example: Example) -> bool:
        """Places `example` in the first row with room on every side; False if none has."""
        need = [len(example[k]) for k in self.lengths]  # [sides]
        row = self._first_fit(need) if self.pack else self.used
        if row == self.rows:
            return False
        self.used = max(self.used, row + 1)
        self.segments[row] += 1
        starts = []
        for side, length in enumerate(self.lengths.values()):
            starts.append(length - self.free[side][row])
            self.free[side][row] -= need[side]
        self.placed.append((row, self.segments[row], starts, example))
        return True

    def _first_fit(self, need: list[int]) -> int:
        """The first used row with room for `need` on every side, else the first unused one."""
        (first, *others), (n, *others_need) = self.free, need
        for row in range(self.used):
            # The first side decides most rows; the others are checked only when it fits.
            if first[row] >= n and all(
                f[row] >= m for f, m in zip(others, others_need, strict=True)
            ):
                return row
        return self.used

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The batch: [rows, length] int32 arrays per side (0 on padding), with segment ids
        (1, 2, ... per row) and positions when packed, decoder_inputs for targets, and a
        [rows] label (-1 on empty rows) for classification."""
        out: dict[str, np.ndarray] = {}
        rows = np.array([p[0] for p in self.placed], np.int64)  # [examples]
        for side, (key, length) in enumerate(self.lengths.items()):
            ids = [p[3][key] for p in self.placed]
            sizes = np.array([len(x) for x in ids], np.int64)  # [examples]
            flat = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
            first = np.cumsum(sizes) - sizes  # [examples]: each example's offset in flat
            pos = np.arange(len(flat)) - np.repeat(first, sizes)  # [tokens]: within example
            at = (
                np.repeat(rows, sizes),
                np.repeat([p[2][side] for p in self.placed], sizes).astype(np.int64) + pos,
            )  # [tokens] row and column of every token
            out[key] = _scatter(self.rows, length, at, flat)
            if self.pack:
                segments = np.repeat([p[1] for p in self.placed], sizes).astype(np.int32)
                out[f"{key}_segment_ids"] = _scatter(self.rows, length, at, segments)
                out[f"{key}_positions"] = _scatter(self.rows, length, at, pos.astype(np.int32))
            if key == "targets":  # Shifted right inside the segment: nothing from a neighbour.
                shifted = np.where(pos == 0, BOS_ID, np.roll(flat, 1)).astype(np.int32)
                out["decoder_inputs"] = _scatter(self.rows, length, at, shifted)
        if self.placed and "label" in self.placed[0][3]:  # Classification: -1 on padding rows.
            out["label"] = np.full((self.rows,), -1, np.int32)
            out["label"][rows] = [p[3]["label"] for p in self.placed]
        return out


def _scatter(
    rows: int, length: int, at: tuple[np.ndarray, np.ndarray], values: np.ndarray
) -> np.ndarray:
    """[rows, length] int32 zeros with values [tokens] written at (row, column) `at`."""
    array = np.zeros((rows, length), np.int32)
    array[at] = values
    return array
