"""The grain input pipelines: shard, shuffle, tokenize, limit lengths, pack or pad, batch.

Every batch is a dict of numpy int32 arrays with pad = 0:
  inputs          [batch, max_source_len]  source ids, each sentence ending with eos
  targets         [batch, max_target_len]  target ids, each sentence ending with eos
  decoder_inputs  [batch, max_target_len]  targets shifted right by one, with bos at the
                                           start of every segment (no leak across segments)
Packed training batches (pack=True) hold several examples per row and add
  inputs_segment_ids, inputs_positions    [batch, max_source_len]
  targets_segment_ids, targets_positions  [batch, max_target_len]
with segment ids 1, 2, ... in each row (0 on padding) and positions restarting at 0 in each
segment; the targets_* arrays also describe decoder_inputs. Evaluation batches are unpacked
and add
  index  [batch]  the example's position in the split, -1 on the padding rows that fill the
                  last batch (so `index >= 0` is the mask of real examples).

Training iterators are grain DatasetIterators: `it.get_state()` after k batches, then
`it.set_state(state)` on a fresh iterator, resumes with exactly batch k + 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import logging

from tfjax.data.tokenizer import BOS_ID, EOS_ID, Tokenizer

READ_CHUNK = 256  # examples read and tokenized together


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How a training pipeline batches one split."""

    batch_size: int  # rows per batch on this process (the global batch is this * processes)
    max_source_len: int  # tokens per inputs row, eos included
    max_target_len: int  # tokens per targets row, eos included
    pack: bool = True  # several examples per row, with segment ids and positions
    seed: int = 0  # seeds the shuffle (a new order each epoch) and the packing
    shuffle: bool = True  # a global shuffle of example indices; False keeps split order
    num_epochs: int | None = None  # None: repeat forever
    truncate: bool = False  # over-long examples: False drops them, True cuts them to fit
    process_index: int | None = None  # this process's shard; None: jax.process_index()
    process_count: int | None = None  # number of shards; None: jax.process_count()
    read_threads: int = 2  # threads that read and tokenize chunks of examples ahead


def train_batch_shapes(
    rows: int, max_source_len: int, max_target_len: int, pack: bool
) -> dict[str, tuple[int, int]]:
    """The shape of each (int32) array of a `train_dataset` batch of `rows` rows."""
    source, target = (rows, max_source_len), (rows, max_target_len)
    shapes = dict(inputs=source, targets=target, decoder_inputs=target)
    if pack:
        shapes.update(
            inputs_segment_ids=source,
            inputs_positions=source,
            targets_segment_ids=target,
            targets_positions=target,
        )
    return shapes


def train_dataset(
    source: Sequence[dict[str, str]], tokenizer: Tokenizer, options: PipelineOptions
) -> grain.IterDataset:
    """Batches of this process's shard of `source` (e.g. `TranslationData.source("train")`).

    Over-long examples are dropped (or truncated, with options.truncate) and counted in the
    log, never silently. The last batch of a finite run is filled with all-pad rows.
    """
    index, count = _process(options.process_index, options.process_count)
    ds = grain.MapDataset.range(len(source))[index::count]
    if options.shuffle:
        ds = ds.shuffle(seed=options.seed)
    ds = ds.repeat(options.num_epochs)  # Each epoch is shuffled anew.
    # Examples are read and tokenized READ_CHUNK at a time: an array_record read call costs
    # about 0.1 ms however few records it fetches, which would otherwise dominate.
    ds = ds.batch(READ_CHUNK).map(_ReadChunk(source, tokenizer))
    threads = options.read_threads
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    ds = grain.experimental.FlatMapIterDataset(ds, _Unchunk())
    limit = LengthLimit(options.max_source_len, options.max_target_len)
    ds = ds.map(limit.truncate) if options.truncate else ds.filter(limit.fits)
    lengths = {"inputs": options.max_source_len, "targets": options.max_target_len}
    if options.pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=options.batch_size, seed=options.seed
        )
        batch_fn = functools.partial(
            grain.experimental.batch_and_pad, batch_size=options.batch_size
        )
    else:
        batch_fn = functools.partial(_pad_batch, batch_size=options.batch_size, lengths=lengths)
    return ds.batch(options.batch_size, batch_fn=batch_fn).map(_add_decoder_inputs)


def eval_dataset(
    source: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_source_len: int,
    max_target_len: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """One pass over this process's shard of `source`, in order, unpacked; `len()` batches.

    No example is lost: the last batch is filled with padding rows (index -1), over-long
    examples are truncated (counted and logged), and every process gets the same number of
    batches, so multi-host evaluation steps stay in lockstep.
    """
    index, count = _process(process_index, process_count)
    rows_per_process = -(-len(source) // count)  # ceil
    num_rows = -(-rows_per_process // batch_size) * batch_size
    # Row i holds example index + i * count of the split; -1 marks padding past the end.
    indices = np.arange(num_rows) * count + index
    indices[indices >= len(source)] = -1
    lengths = {"inputs": max_source_len, "targets": max_target_len}
    ds = grain.MapDataset.source(indices).batch(batch_size)
    ds = ds.map(_EvalBatch(source, tokenizer, lengths))
    return ds.map(_add_decoder_inputs)


class _ReadChunk:
    """Example indices [chunk] -> their tokenized examples, read with one batched call."""

    def __init__(self, source: Sequence[dict[str, str]], tokenizer: Tokenizer):
        self.source = source
        self.tokenizer = tokenizer

    def __call__(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        return _read_and_tokenize(self.source, self.tokenizer, indices.tolist())


class _Unchunk(grain.experimental.FlatMapTransform):
    """A chunk's list of examples -> the examples, one by one."""

    max_fan_out = READ_CHUNK

    def flat_map(self, chunk: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return chunk


class _EvalBatch:
    """Example indices [batch] (-1: padding row) -> an unpacked batch with `index`."""

    def __init__(
        self, source: Sequence[dict[str, str]], tokenizer: Tokenizer, lengths: dict[str, int]
    ):
        self.source = source
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.limit = LengthLimit(lengths["inputs"], lengths["targets"])

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        real = indices[indices >= 0].tolist()  # Padding rows only ever trail the real ones.
        examples = _read_and_tokenize(self.source, self.tokenizer, real)
        examples = [self.limit.truncate(example) for example in examples]
        batch = _pad_batch(examples, batch_size=len(indices), lengths=self.lengths)
        return {**batch, "index": indices.astype(np.int32)}


def _read_and_tokenize(
    source: Sequence[dict[str, str]], tokenizer: Tokenizer, indices: list[int]
) -> list[dict[str, np.ndarray]]:
    """Examples at `indices` -> [{"inputs": [S'], "targets": [T']}] ids ending with eos."""
    if hasattr(source, "__getitems__"):
        examples = source.__getitems__(indices)
    else:
        examples = [source[i] for i in indices]
    inputs = tokenizer.encode_batch([example["source"] for example in examples])
    targets = tokenizer.encode_batch([example["target"] for example in examples])
    return [{"inputs": i, "targets": t} for i, t in zip(inputs, targets, strict=True)]


class LengthLimit:
    """Checks examples against the row lengths; counts and logs the over-long ones.

    Logs a warning at the 1st, 2nd, 4th, 8th, ... over-long example, so a long run reports
    the count without flooding the log. `seen` and `over` hold the counts in this process.
    """

    def __init__(self, max_source_len: int, max_target_len: int):
        self.lengths = {"inputs": max_source_len, "targets": max_target_len}
        self.seen = 0
        self.over = 0

    def fits(self, example: dict[str, np.ndarray]) -> bool:
        """For `filter`: False (and counted as dropped) when a side is too long."""
        return not self._count(example, "Dropped")

    def truncate(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cuts each side to its row length, keeping the final eos."""
        if not self._count(example, "Truncated"):
            return example
        cut = {}
        for key, ids in example.items():
            limit = self.lengths[key]
            cut[key] = (
                np.append(ids[: limit - 1], EOS_ID).astype(np.int32) if len(ids) > limit else ids
            )
        return cut

    def _count(self, example: dict[str, np.ndarray], action: str) -> bool:
        """True if too long; logs at power-of-two counts."""
        self.seen += 1
        if all(len(example[key]) <= limit for key, limit in self.lengths.items()):
            return False
        self.over += 1
        if self.over & (self.over - 1) == 0:
            logging.warning(
                "%s %d of %d examples so far: inputs longer than %d or targets longer than %d "
                "tokens (eos included).",
                action,
                self.over,
                self.seen,
                self.lengths["inputs"],
                self.lengths["targets"],
            )
        return True


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count), defaulting to JAX's multi-controller values."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    return index, count


def _pad_batch(
    examples: Sequence[dict[str, np.ndarray]], batch_size: int, lengths: dict[str, int]
) -> dict[str, np.ndarray]:
    """Up to batch_size examples -> inputs [batch, S], targets [batch, T]; 0 fills the rest."""
    batch = {key: np.zeros((batch_size, length), np.int32) for key, length in lengths.items()}
    for row, example in enumerate(examples):
        for key, ids in example.items():
            batch[key][row, : len(ids)] = ids
    return batch


def _add_decoder_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds decoder_inputs [batch, T]: targets shifted right within each target segment.

    A position gets bos where its segment starts, the previous target otherwise, and 0 on
    padding. Unpacked rows are one segment: wherever targets are not pad.
    """
    targets = batch["targets"]  # [B, T]
    segments = batch.get("targets_segment_ids", (targets != 0).astype(np.int32))  # [B, T]
    decoder_inputs = np.zeros_like(targets)
    decoder_inputs[:, 1:] = targets[:, :-1]
    starts = np.ones_like(segments, dtype=bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    decoder_inputs[starts] = BOS_ID
    decoder_inputs[segments == 0] = 0
    return {**batch, "decoder_inputs": decoder_inputs}
