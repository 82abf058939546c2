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
segment; the targets_* arrays also describe decoder_inputs. Encoder-only tasks
(`encoder_only=True`, sources of {"source"[, "label"]} examples) have no targets:
  inputs          [batch, max_source_len]  bos (the classifier's [CLS]), the text's ids, eos
  label           [batch]                  the class index, -1 on padding rows (classification)
Evaluation batches are unpacked and add
  index  [batch]  the example's position in the split, -1 on the padding rows that fill the
                  last batch (so `index >= 0` is the mask of real examples).

Training: chunks of shuffled indices (`IndexChunks`, one permutation per epoch) are read and
tokenized READ_CHUNK at a time, or taken from a `token_cache.TokenizedSplit`
(`tokenized_train_split`), then packed into batches (`packing.PackedBatches`). On a 2-core
CPU the Multi30k recipe's batches come at about 1,200/s from the tokenized split, 60/s
before the cache, the vectorized index stream and the packing stage.

Training iterators are grain DatasetIterators: `it.get_state()` after k batches, then
`it.set_state(state)` on a fresh iterator, resumes with exactly batch k + 1.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import logging
from etils import epath

from tfjax.data.packing import PackedBatches, padded_rows
from tfjax.data.token_cache import TokenizedSplit, cached_split
from tfjax.data.tokenizer import BOS_ID, EOS_ID, Tokenizer

READ_CHUNK = 256  # examples read and tokenized together


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How a training pipeline batches one split."""

    batch_size: int  # rows per batch on this process (the global batch is this * processes)
    max_source_len: int  # tokens per inputs row, eos included
    max_target_len: int  # tokens per targets row, eos included
    pack: bool = True  # several examples per row, with segment ids and positions
    seed: int = 0  # seeds the shuffle (a new order each epoch)
    shuffle: bool = True  # a global shuffle of example indices; False keeps split order
    num_epochs: int | None = None  # None: repeat forever
    truncate: bool = False  # over-long examples: False drops them, True cuts them to fit
    process_index: int | None = None  # this process's shard; None: jax.process_index()
    process_count: int | None = None  # number of shards; None: jax.process_count()
    read_threads: int = 2  # threads that read and tokenize chunks of examples ahead
    encoder_only: bool = False  # inputs (and labels) only; max_target_len is unused

    @property
    def lengths(self) -> dict[str, int]:
        """Row length per array the examples are cut or packed to."""
        return _lengths(self.max_source_len, self.max_target_len, self.encoder_only)


def _lengths(max_source_len: int, max_target_len: int, encoder_only: bool) -> dict[str, int]:
    if encoder_only:
        return {"inputs": max_source_len}
    return {"inputs": max_source_len, "targets": max_target_len}


def train_batch_shapes(
    rows: int,
    max_source_len: int,
    max_target_len: int,
    pack: bool,
    *,
    encoder_only: bool = False,
    labels: bool = False,
) -> dict[str, tuple[int, ...]]:
    """The shape of each (int32) array of a `train_dataset` batch of `rows` rows."""
    source, target = (rows, max_source_len), (rows, max_target_len)
    shapes: dict[str, tuple[int, ...]] = dict(inputs=source)
    if not encoder_only:
        shapes.update(targets=target, decoder_inputs=target)
    if pack:
        shapes.update(inputs_segment_ids=source, inputs_positions=source)
        if not encoder_only:
            shapes.update(targets_segment_ids=target, targets_positions=target)
    if labels:
        shapes["label"] = (rows,)
    return shapes


def train_dataset(
    source: Sequence[dict[str, str]] | TokenizedSplit,
    tokenizer: Tokenizer,
    options: PipelineOptions,
) -> grain.IterDataset:
    """Batches of this process's shard of `source` (e.g. `TranslationData.source("train")`,
    or this process's `tokenized_train_split` of it: the same batches, faster).

    Over-long examples are dropped (or truncated, with options.truncate) and counted in the
    log, never silently. The last batch of a finite run is filled with all-pad rows.
    """
    index, count = _process(options.process_index, options.process_count)
    if isinstance(source, TokenizedSplit):  # Already this process's shard.
        if source.shard != (index, count):
            raise ValueError(f"the tokenized split is shard {source.shard}, not {(index, count)}")
        shard = range(len(source))
    else:
        shard = range(index, len(source), count)
    # Examples are read and tokenized READ_CHUNK at a time: an array_record read call costs
    # about 0.1 ms however few records it fetches, which would otherwise dominate.
    ds = IndexChunks(shard, READ_CHUNK, options.seed, options.shuffle, options.num_epochs)
    ds = ds.map(_ReadChunk(source, tokenizer))
    # Reading a tokenized split costs ~1 us an example: reader threads only contend for the
    # GIL with the packing (measured before the index stream was vectorized: 365 batches/s
    # without, 242 with two; about even since).
    threads = 0 if isinstance(source, TokenizedSplit) else options.read_threads
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    limit = LengthLimit(options.lengths)
    return PackedBatches(
        ds,
        rows=options.batch_size,
        lengths=options.lengths,
        pack=options.pack,
        limit=limit.truncate_all if options.truncate else limit.keep_fitting,
    )


def tokenized_train_split(
    source: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    options: PipelineOptions,
    root: epath.Path,
    *,
    identity: str,
) -> Sequence[dict[str, str]] | TokenizedSplit:
    """This process's shard of a training `source`, tokenized once under `root` (see
    `token_cache`), for `train_dataset`; `source` itself when no cache can be written.

    identity names the dataset and direction; the tokenizer's model is added to it, so a
    new vocabulary gets a new cache.
    """
    shard = _process(options.process_index, options.process_count)
    tokens = hashlib.sha256(tokenizer.model_proto).hexdigest()
    cached = cached_split(
        functools.partial(_read_and_tokenize, source, tokenizer),
        len(source),
        root,
        name="train",
        identity=f"{identity}|{tokens}|encoder_only={options.encoder_only}",
        shard=shard,
    )
    return source if cached is None else cached


def eval_dataset(
    source: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_source_len: int,
    max_target_len: int,
    process_index: int | None = None,
    process_count: int | None = None,
    encoder_only: bool = False,
) -> grain.MapDataset:
    """One pass over this process's shard of `source`, in order, unpacked; `len()` batches.

    No example is lost: the last batch is filled with padding rows (index -1), over-long
    examples are truncated (counted and logged), and every process gets the same number of
    batches, so multi-host evaluation steps stay in lockstep. `encoder_only`: as in
    `PipelineOptions` (max_target_len is then unused).
    """
    index, count = _process(process_index, process_count)
    rows_per_process = -(-len(source) // count)  # ceil
    num_rows = -(-rows_per_process // batch_size) * batch_size
    # Row i holds example index + i * count of the split; -1 marks padding past the end.
    indices = np.arange(num_rows) * count + index
    indices[indices >= len(source)] = -1
    lengths = _lengths(max_source_len, max_target_len, encoder_only)
    ds = grain.MapDataset.source(indices).batch(batch_size)
    return ds.map(_EvalBatch(source, tokenizer, lengths))


class IndexChunks(grain.MapDataset):
    """Chunk k -> the example indices [<= chunk] at positions k * chunk ... of the stream of
    `num_epochs` passes (None: endless) over `indices`, each pass in its own shuffled order.

    The same as grain's range -> shuffle -> repeat -> batch, without its per-index calls:
    one permutation per epoch (seeded by seed and epoch), sliced per chunk.
    """

    def __init__(
        self, indices: range, chunk: int, seed: int, shuffle: bool, num_epochs: int | None
    ):
        super().__init__([])
        self.indices, self.chunk, self.seed, self.shuffle = indices, chunk, seed, shuffle
        self.total = None if num_epochs is None else len(indices) * num_epochs  # positions

    def __len__(self) -> int:
        return sys.maxsize if self.total is None else -(-self.total // self.chunk)

    def __getitem__(self, k: int) -> np.ndarray:
        if isinstance(k, slice):
            return self.slice(k)
        start = k * self.chunk
        stop = start + self.chunk if self.total is None else min(start + self.chunk, self.total)
        size, pieces = len(self.indices), []
        while start < stop:  # A chunk may span the end of one epoch and the start of the next.
            epoch, offset = divmod(start, size)
            take = min(stop - start, size - offset)
            pieces.append(self._order(epoch)[offset : offset + take])
            start += take
        return np.concatenate(pieces)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one dataset per run; frees with it
    def _order(self, epoch: int) -> np.ndarray:
        """The indices [size] in epoch `epoch`'s order."""
        order = np.arange(self.indices.start, self.indices.stop, self.indices.step)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order


class _ReadChunk:
    """Example indices [chunk] -> their tokenized examples, read with one batched call."""

    def __init__(self, source: Sequence[dict[str, str]], tokenizer: Tokenizer):
        self.source = source
        self.tokenizer = tokenizer

    def __call__(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        if isinstance(self.source, TokenizedSplit):
            return self.source.examples(indices)
        return _read_and_tokenize(self.source, self.tokenizer, indices.tolist())


class _EvalBatch:
    """Example indices [batch] (-1: padding row) -> an unpacked batch with `index`."""

    def __init__(
        self, source: Sequence[dict[str, str]], tokenizer: Tokenizer, lengths: dict[str, int]
    ):
        self.source = source
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.limit = LengthLimit(lengths)

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        real = indices[indices >= 0].tolist()  # Padding rows only ever trail the real ones.
        examples = _read_and_tokenize(self.source, self.tokenizer, real)
        batch = padded_rows(self.limit.truncate_all(examples), len(indices), self.lengths)
        return {**batch, "index": indices.astype(np.int32)}


def _read_and_tokenize(
    source: Sequence[dict[str, str]], tokenizer: Tokenizer, indices: list[int]
) -> list[dict[str, np.ndarray]]:
    """Examples at `indices` -> [{"inputs": [S'], "targets": [T']}] ids ending with eos, or
    for encoder-only examples (no "target") [{"inputs": [S'] bos first[, "label": int]}]."""
    if hasattr(source, "__getitems__"):
        examples = source.__getitems__(indices)
    else:
        examples = [source[i] for i in indices]
    inputs = tokenizer.encode_batch([example["source"] for example in examples])
    if examples and "target" not in examples[0]:
        return [_encoder_example(ids, e) for ids, e in zip(inputs, examples, strict=True)]
    targets = tokenizer.encode_batch([example["target"] for example in examples])
    return [{"inputs": i, "targets": t} for i, t in zip(inputs, targets, strict=True)]


def _encoder_example(ids: np.ndarray, example: dict) -> dict[str, np.ndarray]:
    """Text ids [S'] (eos last) -> inputs [S' + 1] with bos first, and the label if any."""
    out = {"inputs": np.concatenate([[BOS_ID], ids]).astype(np.int32)}
    if "label" in example:
        out["label"] = np.int32(example["label"])
    return out


class LengthLimit:
    """Checks examples against the row lengths; counts and logs the over-long ones.

    Logs a warning at the 1st, 2nd, 4th, 8th, ... over-long example, so a long run reports
    the count without flooding the log. `seen` and `over` hold the counts in this process.
    """

    def __init__(self, lengths: dict[str, int]):
        self.lengths = dict(lengths)  # row length per array, e.g. {"inputs": S, "targets": T}
        self.seen = 0
        self.over = 0

    def fits(self, example: dict[str, np.ndarray]) -> bool:
        """False (and counted as dropped) when a side is too long."""
        return not self._count(example, "Dropped")

    def keep_fitting(self, examples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """The examples that fit; the others are counted as dropped."""
        return [example for example in examples if self.fits(example)]

    def truncate_all(self, examples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Every example, the over-long ones cut to fit."""
        return [self.truncate(example) for example in examples]

    def truncate(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cuts each side to its row length, keeping the final eos."""
        if not self._count(example, "Truncated"):
            return example
        cut = dict(example)
        for key, limit in self.lengths.items():
            ids = example[key]
            if len(ids) > limit:
                cut[key] = np.append(ids[: limit - 1], EOS_ID).astype(np.int32)
        return cut

    def _count(self, example: dict[str, np.ndarray], action: str) -> bool:
        """True if too long; logs at power-of-two counts."""
        self.seen += 1
        if all(len(example[key]) <= limit for key, limit in self.lengths.items()):
            return False
        self.over += 1
        if self.over & (self.over - 1) == 0:
            limits = " or ".join(f"{key} longer than {n}" for key, n in self.lengths.items())
            logging.warning(
                "%s %d of %d examples so far: %s tokens (eos included).",
                action,
                self.over,
                self.seen,
                limits,
            )
        return True


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count), defaulting to JAX's multi-controller values."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    return index, count
