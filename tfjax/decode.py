"""The decoders' contract (callback, DecodeSpec, logits processors); greedy, sampling, scoring."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

# The decoders never see the model, only this callback:
#   tokens_to_logits(ids, cache) -> (logits, new_cache)
#   ids:       int32 [rows, 1], the previous token of every row (bos_id at step 0).
#   cache:     any pytree (a Linen model's "cache" collection), built by the caller for
#              rows = batch (greedy, sampling) or rows = batch * beam (beam search,
#              batch-major: row = b * beam + k).
#   logits:    float [rows, vocab] for the next token; cast to float32 by the decoders.
#   new_cache: the same structure, shapes and dtypes as `cache` (it is a loop carry).
# The callback keeps its own position in the cache; the decoders pass the step index only
# to the spec's logits processor.
#
# Beam search reorders the cache after each step: every leaf whose leading axis has size
# batch * beam is gathered by the beam each surviving hypothesis continues
# (`beam_search.reorder_cache`); every other leaf (leading size batch, or a scalar) is left
# as it is. That is all the decoders assume: state that must follow a hypothesis has one row
# per hypothesis, state kept per sentence or shared has not. With beam == 1 the two kinds
# coincide and reordering is the identity. tfjax's Transformer (see `tfjax.model`) has one
# per-hypothesis leaf, its `origin` table [batch * beam, max_len]: the row whose beam slot
# holds each earlier position of a hypothesis. Its self-attention keys and values
# [batch, heads, head_dim, beam, max_len] (a slot per beam), encoder-decoder keys and values
# and source mask (per sentence) and position `index` (a scalar) stay where they were
# written, so no key or value is copied between beams.
Cache = Any
TokensToLogits = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
# An optional rewrite of the next-token logits, applied by the decoders at every step:
#   processor(logits [rows, vocab] float32, step [] int32) -> [rows, vocab] float32,
# where step is the index of the token being chosen (0 for the one after bos). The decoders
# take the log-softmax of what it returns, so banning a token (-inf) renormalises the rest;
# recorded log-probabilities and alternatives are those of the processed distribution, and
# sampling applies the processor before `filter_logits`.
LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]
# Greedy / sampling carry: (cache, last tokens [batch] int32, ended [batch] bool).
_RowsCarry = tuple[Cache, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What every decoder needs besides its shapes: special ids, records, processing controls.

    Frozen and hashable, so it is a static jit argument. Processors compare by identity: an
    equal spec with the same processor object reuses a compilation, a new processor object
    compiles anew.
    """

    bos_id: int  # fed as the previous token at step 0
    eos_id: int  # ends a hypothesis; kept in the output
    pad_id: int  # written after a hypothesis's eos (and in its records: id pad_id, prob 0)
    num_top: int = 0  # alternatives (top ids and probabilities) recorded per step; 0: none
    logits_processor: LogitsProcessor | None = None  # see `LogitsProcessor`; None: the model's
    # eos is banned at steps < min_length: at least min_length tokens precede eos, so an ended
    # hypothesis has length (eos counted) >= min_length + 1. Hugging Face's `min_new_tokens`;
    # its encoder-decoder `min_length` counts the decoder start token: its m is m - 1 here.
    min_length: int = 0
    # Bans every token that would complete an n-gram (n = no_repeat_ngram_size) already in the
    # hypothesis's own generated tokens (bos excluded); 0: no ban. See `repeated_ngram_mask`.
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        for name in ("min_length", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DecodeSpec.{name} must be an int >= 0, got {value!r}")

    def next_logits(self, logits: jax.Array, step: jax.Array, history: jax.Array) -> jax.Array:
        """[rows, vocab] logits of the token at `step` -> float32, processed, to choose from.

        `history` [rows, max_decode_len] int holds each row's tokens; those at positions
        < step are the row's generated ones (the rest are not read). The spec's own controls
        (min_length, no_repeat_ngram_size) run first, then its logits processor, the order
        Hugging Face applies `min_length` and `forced_eos_token_id` in, so a forced eos wins.
        With both controls 0 (Python ifs on the static spec) the program does no extra work.
        """
        logits = logits.astype(jnp.float32)
        vocab = logits.shape[-1]
        if self.min_length > 0:
            no_eos = (step < self.min_length) & (jnp.arange(vocab) == self.eos_id)  # [vocab]
            logits = jnp.where(no_eos, -jnp.inf, logits)
        if self.no_repeat_ngram_size > 0:
            banned = repeated_ngram_mask(history, step, self.no_repeat_ngram_size, vocab)
            logits = jnp.where(banned, -jnp.inf, logits)
        if self.logits_processor is None:
            return logits
        return self.logits_processor(logits, step)


def repeated_ngram_mask(history: jax.Array, step: jax.Array, n: int, vocab: int) -> jax.Array:
    """Tokens that would repeat an n-gram: Hugging Face's `NoRepeatNGramLogitsProcessor`.

    The candidate for position `step` is banned when the n-gram it ends, history[step - n + 1
    : step] + (candidate,), equals an n-gram history[j : j + n] with j + n <= step. Only the
    generated tokens count: bos is not part of the sequence. Hugging Face runs the processor on
    its `input_ids`, which begin with the decoder start token, so it also bans the n-grams that
    begin with that token; the two agree whenever the start token is never generated again
    (`generate.translation_spec` bans bos). Each row compares its last n - 1 tokens against
    every window of its history: O(max_decode_len * n) per row, no loop over steps.

    Args:
      history: [rows, max_decode_len] int; positions < step are each row's generated tokens.
      step: [] int32, the position of the token being chosen.
      n: the n-gram size, >= 1 (1 bans every token generated before).
      vocab: the vocabulary size.

    Returns:
      [rows, vocab] bool, True for banned tokens.
    """
    rows, length = history.shape
    if n >= length:  # a repeat needs n + 1 tokens, one more than the longest hypothesis
        return jnp.zeros((rows, vocab), jnp.bool_)
    # [rows, length] -> [rows, length + n - 1], so each window start j < length has n tokens;
    # windows reaching past the end are never valid (j + n <= step < length).
    padded = jnp.pad(history, ((0, 0), (0, n - 1)), constant_values=-1)
    windows = [padded[:, k : k + length] for k in range(n)]  # n x [rows, length]: [j] = h[j + k]
    # The last n - 1 generated tokens [rows, n - 1]; the start is clamped to 0 while step < n - 1,
    # when no window is valid anyway.
    last = lax.dynamic_slice_in_dim(history, step - (n - 1), n - 1, axis=1)
    match = (jnp.arange(length) + n <= step)[None, :]  # [1, length]: window j fully generated
    for k in range(n - 1):
        match = match & (windows[k] == last[:, k : k + 1])  # [rows, length]
    # Scatter each matching window's next token; non-matching ones aim at `vocab`, dropped.
    next_ids = jnp.where(match, windows[n - 1], vocab)  # [rows, length]
    row_ids = jnp.arange(rows)[:, None]  # [rows, 1]
    return jnp.zeros((rows, vocab), jnp.bool_).at[row_ids, next_ids].set(True, mode="drop")


def ban_tokens(ids: Sequence[int]) -> LogitsProcessor:
    """Never choose `ids`: Hugging Face's `bad_words_ids` with one-token entries.

    Unlike here, Hugging Face beam search bans on log-probabilities without renormalising,
    so its beam scores differ from ours by log(1 - p(banned)) per step.
    """
    banned = tuple(ids)  # a tuple, so that making a processor allocates no device array

    def processor(logits: jax.Array, step: jax.Array) -> jax.Array:
        return logits.at[:, jnp.asarray(banned, jnp.int32)].set(-jnp.inf)

    return processor


def force_eos_at_end(eos_id: int, max_decode_len: int) -> LogitsProcessor:
    """Only eos at the last step: Hugging Face's `forced_eos_token_id`, with log p(eos) = 0."""

    def processor(logits: jax.Array, step: jax.Array) -> jax.Array:
        only_eos = jnp.where(jnp.arange(logits.shape[-1]) == eos_id, 0.0, -jnp.inf)  # [vocab]
        return jnp.where(step == max_decode_len - 1, only_eos, logits)

    return processor


def chain(*processors: LogitsProcessor) -> LogitsProcessor:
    """Applies `processors` in order, as a Hugging Face `LogitsProcessorList` does."""

    def processor(logits: jax.Array, step: jax.Array) -> jax.Array:
        for p in processors:
            logits = p(logits, step)
        return logits

    return processor


@flax.struct.dataclass
class DecodeOutput:
    """One hypothesis per sentence, from `greedy_search` or `sample`."""

    tokens: jax.Array  # [batch, max_decode_len] int32; bos excluded, eos kept, pad_id after it.
    token_log_probs: jax.Array  # [batch, max_decode_len] float32; log p(token), 0 after the end.
    lengths: jax.Array  # [batch] int32; tokens up to and including eos (max_decode_len if none).
    score: jax.Array  # [batch] float32; sum of token_log_probs, no length penalty.
    top_ids: jax.Array  # [batch, max_decode_len, num_top] int32; pad_id after the end.
    top_probs: jax.Array  # [batch, max_decode_len, num_top] float32; 0 after the end.


@flax.struct.dataclass
class _Step:
    """What one greedy or sampling step emits for every row."""

    tokens: jax.Array  # [batch] int32
    token_log_probs: jax.Array  # [batch] float32
    top_ids: jax.Array  # [batch, num_top] int32
    top_probs: jax.Array  # [batch, num_top] float32


def log_softmax(logits: jax.Array) -> jax.Array:
    """[..., vocab] float logits -> [..., vocab] float32 log-probabilities."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def top_alternatives(log_probs: jax.Array, num_top: int) -> tuple[jax.Array, jax.Array]:
    """[..., vocab] log-probs -> ids [..., num_top] int32 and probabilities [..., num_top]."""
    if num_top == 0:
        # Empty arrays keep the output structure fixed without a top-k over the vocabulary.
        empty = log_probs.shape[:-1] + (0,)
        return jnp.zeros(empty, jnp.int32), jnp.zeros(empty, jnp.float32)
    # [..., vocab] -> [rows, vocab] -> [rows, num_top] -> [..., num_top]
    top_log_probs, top_ids = top_k_blocked(log_probs.reshape(-1, log_probs.shape[-1]), num_top)
    shape = (*log_probs.shape[:-1], num_top)
    return top_ids.reshape(shape).astype(jnp.int32), jnp.exp(top_log_probs).reshape(shape)


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` of [..., n] -> int32 [...]: the first index of the largest
    value, NaN counting as largest (the first NaN wins), as jnp.argmax decides.

    Written as a max and then a min over the indices that hold it: XLA:CPU runs argmax's
    (value, index) reduction one element at a time, 4-5x slower over [32, 8,000] logits
    (about a tenth of a greedy step of a 32-sentence batch), where these two vectorise.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    nan = jnp.isnan(x)  # XLA:CPU's vectorised max does not always return a row's NaN
    is_top = jnp.where(nan.any(axis=-1, keepdims=True), nan, x == top)
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(is_top, index, x.shape[-1]), axis=-1)


def top_k_blocked(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` of [rows, n] -> values, indices [rows, k], through blocks of `block`.

    XLA:CPU's top-k costs about as much per element as a small matmul: over the beam-4
    candidates of a 32-sentence batch (4 x 8,000 per row) it took a tenth of each beam step.
    Here the whole row is only max-reduced per block; the k best blocks (by their best
    element) hold every top-k element, since each block ranked above an element's block has
    its own element ranked above it. Those blocks, in index order, go through the exact
    top-k, so values, indices and tie order (lower index first) are `lax.top_k`'s.
    """
    rows, n = x.shape
    num_blocks = -(-n // block)
    if num_blocks <= k:
        return lax.top_k(x, k)
    # Padding sorts last: lowest value, and highest index among equals.
    padded = jnp.pad(x, ((0, 0), (0, num_blocks * block - n)), constant_values=-jnp.inf)
    blocks = padded.reshape(rows, num_blocks, block)  # [rows, n / block, block]
    _, best = lax.top_k(blocks.max(axis=-1), k)  # [rows, k] block indices
    best = jnp.sort(best, axis=-1)  # index order, so ties still go to the lower index
    chosen = jnp.take_along_axis(blocks, best[:, :, None], axis=1)  # [rows, k, block]
    values, within = lax.top_k(chosen.reshape(rows, k * block), k)  # [rows, k]
    block_of = jnp.take_along_axis(best, within // block, axis=1)
    return values, block_of * block + within % block


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering, as Hugging Face applies them.

    Top-p keeps the smallest set of most probable tokens whose probability mass, under the
    tempered and top-k-filtered distribution, is at least `top_p`: a token is kept when the
    mass of the tokens ranked above it is below `top_p`, so the most probable one always is.

    Args:
      logits: [rows, vocab] float.
      temperature: > 0; divides the logits.
      top_k: keep the `top_k` most probable tokens; 0 keeps all.
      top_p: in (0, 1]; 1 keeps all.

    Returns:
      [rows, vocab] float32 tempered logits, -inf for filtered tokens.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    top_k = vocab if top_k == 0 else min(top_k, vocab)
    if top_k == vocab and top_p == 1:
        return logits
    sorted_logits, order = lax.top_k(logits, vocab)  # [rows, vocab], most probable first
    keep = jnp.broadcast_to(jnp.arange(vocab) < top_k, sorted_logits.shape)
    if top_p < 1:
        probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        # Exclusive prefix sum [rows, vocab]: the mass ranked above each token.
        mass_above = jnp.pad(jnp.cumsum(probs, axis=-1)[:, :-1], ((0, 0), (1, 0)))
        keep = keep & (mass_above < top_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep_by_id = jnp.zeros_like(keep).at[rows, order].set(keep)  # sorted order -> vocab order
    return jnp.where(keep_by_id, logits, -jnp.inf)


def _record(log_probs: jax.Array, tokens: jax.Array, num_top: int) -> _Step:
    """A step's record of tokens [rows] chosen from log_probs [rows, vocab]: their
    log-probabilities and the num_top alternatives."""
    top_ids, top_probs = top_alternatives(log_probs, num_top)  # [rows, num_top]
    token_lp = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    return _Step(tokens=tokens, token_log_probs=token_lp, top_ids=top_ids, top_probs=top_probs)


def _decode_rows(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    spec: DecodeSpec,
    *,
    batch_size: int,
    max_decode_len: int,
) -> DecodeOutput:
    """One hypothesis per row; `choose(logits [batch, vocab], step) -> [batch]` picks tokens.

    `choose` sees the processed float32 logits (`DecodeSpec.next_logits`), whose history is
    the [batch, max_decode_len] token buffer being written.
    """
    pad_id, num_top = spec.pad_id, spec.num_top

    def step(carry: _RowsCarry, history: jax.Array, t: jax.Array) -> tuple[_RowsCarry, _Step]:
        # Ended rows feed their pad_id back; their logits are computed but not used.
        cache, last, finished = carry  # last, finished: [batch]
        logits, cache = tokens_to_logits(last[:, None], cache)  # [batch, 1] -> [batch, vocab]
        logits = spec.next_logits(logits, t, history)
        tokens = jnp.where(finished, pad_id, choose(logits, t)).astype(jnp.int32)
        rec = _record(log_softmax(logits), tokens, num_top)
        out = _Step(
            tokens=tokens,
            token_log_probs=jnp.where(finished, 0.0, rec.token_log_probs),
            top_ids=jnp.where(finished[:, None], pad_id, rec.top_ids),
            top_probs=jnp.where(finished[:, None], 0.0, rec.top_probs),
        )
        return (cache, tokens, finished | (tokens == spec.eos_id)), out

    def running(state: tuple[_RowsCarry, _Step, jax.Array]) -> jax.Array:
        (_, _, finished), _, t = state
        return (t < max_decode_len) & ~jnp.all(finished)

    def body(state: tuple[_RowsCarry, _Step, jax.Array]) -> tuple[_RowsCarry, _Step, jax.Array]:
        carry, steps, t = state
        carry, out = step(carry, steps.tokens, t)
        # Column t of each [batch, max_decode_len, ...] buffer, written in place.
        steps = jax.tree.map(lambda buf, x: buf.at[:, t].set(x), steps, out)
        return carry, steps, t + 1

    init = (
        cache,
        jnp.full((batch_size,), spec.bos_id, jnp.int32),
        jnp.zeros((batch_size,), jnp.bool_),
    )
    # Steps never taken (every row ended) keep these: pad tokens, probability 0.
    empty = _Step(
        tokens=jnp.full((batch_size, max_decode_len), pad_id, jnp.int32),
        token_log_probs=jnp.zeros((batch_size, max_decode_len), jnp.float32),
        top_ids=jnp.full((batch_size, max_decode_len, num_top), pad_id, jnp.int32),
        top_probs=jnp.zeros((batch_size, max_decode_len, num_top), jnp.float32),
    )
    # A while loop that stops once every row has ended, not a scan with a skipping cond: the
    # cond made XLA copy the whole cache (its operand) and the step's loop-invariant work
    # (parameter casts and stacks) at every step.
    _, steps, _ = lax.while_loop(running, body, (init, empty, jnp.zeros((), jnp.int32)))
    return DecodeOutput(
        tokens=steps.tokens,
        token_log_probs=steps.token_log_probs,
        lengths=_lengths(steps.tokens, spec.eos_id),
        score=steps.token_log_probs.sum(axis=-1),
        top_ids=steps.top_ids,
        top_probs=steps.top_probs,
    )


def _lengths(tokens: jax.Array, eos_id: int) -> jax.Array:
    """[..., len] tokens -> [...] int32 position of the first eos plus one, len without eos."""
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, tokens.shape[-1]).astype(jnp.int32)


def greedy_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    spec: DecodeSpec,
    *,
    batch_size: int,
    max_decode_len: int,
) -> DecodeOutput:
    """Takes the most probable token (after the spec's processor) at every step.

    A row ends at its first eos, or at `max_decode_len` without one; its score is the sum of
    its token log-probabilities either way. The loop stops once every row has ended, so no
    model call is made for steps after that.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, rows = batch_size.
      spec: special ids, alternatives to record, min_length, no_repeat_ngram_size and the
        logits processor (see `DecodeSpec.next_logits`).
      batch_size: number of rows.
      max_decode_len: number of tokens to generate at most, eos included.

    Returns:
      A `DecodeOutput`; top_ids / top_probs are the `spec.num_top` most probable tokens of
      the processed softmax at each step.
    """
    return _decode_rows(
        tokens_to_logits,
        cache,
        lambda logits, t: argmax(logits),
        spec,
        batch_size=batch_size,
        max_decode_len=max_decode_len,
    )


def greedy_steps(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    last: jax.Array,
    steps: jax.Array,
    spec: DecodeSpec,
    num_steps: int,
) -> tuple[Cache, _Step]:
    """`num_steps` greedy steps of rows that decode independently: continuous batching's.

    The host loop (`tfjax.continuous`) decides when a row ends and what fills it next; this
    only chooses every row's next tokens as `greedy_search` would at that row's positions and
    records them. A row that ends within the steps goes on decoding: the host drops what
    follows its end. The spec's controls and processor get the positions as [rows, 1], so
    those written with broadcasting (min_length, `force_eos_at_end`, `ban_tokens`) act per
    row; no_repeat_ngram_size needs the history, which is not kept.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, one row per sentence.
      last: [rows] int32 each row's previous token (bos_id at its position 0).
      steps: [rows] int32 each row's position, the index of the next token it chooses.
      spec: as in `greedy_search`, with no_repeat_ngram_size 0.
      num_steps: steps to take.

    Returns:
      The new cache and the steps' tokens [rows, num_steps], log-probabilities [rows,
      num_steps] and alternatives [rows, num_steps, num_top].
    """
    if spec.no_repeat_ngram_size:
        raise ValueError("greedy_steps keeps no history: no_repeat_ngram_size must be 0")

    def step(carry: tuple[Cache, jax.Array, jax.Array], _) -> tuple[tuple, _Step]:
        cache, last, steps = carry
        logits, cache = tokens_to_logits(last[:, None], cache)  # [rows, 1] -> [rows, vocab]
        logits = spec.next_logits(logits, steps[:, None], history=last[:, None])
        tokens = argmax(logits)  # as greedy_search chooses
        return (cache, tokens, steps + 1), _record(log_softmax(logits), tokens, spec.num_top)

    (cache, _, _), records = lax.scan(step, (cache, last, steps), length=num_steps)
    # [num_steps, rows, ...] -> [rows, num_steps, ...]
    return cache, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), records)


def sample(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    rng: jax.Array,
    spec: DecodeSpec,
    *,
    batch_size: int,
    max_decode_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> DecodeOutput:
    """Samples each token from the processed distribution after `filter_logits`.

    Step t draws with `jax.random.fold_in(rng, t)`, so a step's draw does not depend on how
    many steps ran before it. The spec's processor runs before the filtering. Recorded
    log-probabilities and alternatives come from the processed softmax (temperature 1,
    unfiltered), so they equal teacher-forced scores of the same tokens under the same
    processor; the filtering only decides which token is drawn. top_k=1 is greedy. Ends and
    scores rows as `greedy_search` does.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, rows = batch_size.
      rng: a PRNG key.
      spec, batch_size, max_decode_len: as in `greedy_search`.
      temperature, top_k, top_p: as in `filter_logits`.

    Returns:
      A `DecodeOutput`.
    """

    def choose(logits: jax.Array, t: jax.Array) -> jax.Array:
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), filtered, axis=-1)

    return _decode_rows(
        tokens_to_logits,
        cache,
        choose,
        spec,
        batch_size=batch_size,
        max_decode_len=max_decode_len,
    )


def target_log_probs(logits: jax.Array, targets: jax.Array, *, pad_id: int) -> jax.Array:
    """Teacher-forced log-probabilities of given targets.

    Args:
      logits: [batch, len, vocab] float; position i predicts targets[:, i].
      targets: [batch, len] int; pad_id marks padding.
      pad_id: the padding id, scored 0 wherever it occurs.

    Returns:
      [batch, len] float32 log p(targets), 0 at padding; sum over len for a sequence score.
    """
    log_probs = log_softmax(logits)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [batch, len]
    return jnp.where(targets != pad_id, picked, 0.0)
