"""Decoding over a caller's cache: greedy, sampling, beam search; teacher-forced scoring."""

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
from jax import lax

# The decoder never sees the model, only this callback:
#   tokens_to_logits(ids, cache) -> (logits, new_cache)
#   ids:       int32 [rows, 1], the previous token of every row (bos_id at step 0).
#   cache:     any pytree (a Linen model's "cache" collection), built by the caller for
#              rows = batch (greedy, sampling) or rows = batch * beam (beam search).
#   logits:    float [rows, vocab] for the next token; cast to float32 here.
#   new_cache: the same structure, shapes and dtypes as `cache` (it is a loop carry).
# Beam search lays rows out batch-major (row = b * beam + k) and, after each step, reorders
# every cache leaf whose leading axis has size batch * beam by the beam each surviving
# hypothesis continues. All other leaves are left as they are: encoder-decoder keys/values
# of leading size batch are kept once per sentence (the callback broadcasts them over the
# beam), and scalar step counters are shared. With beam == 1 the two kinds coincide and
# reordering is the identity.
Cache = Any
TokensToLogits = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
LengthPenalty = Literal["gnmt", "plain"]
# Greedy / sampling carry: (cache, last tokens [batch] int32, ended [batch] bool).
_RowsCarry = tuple[Cache, jax.Array, jax.Array]


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
class BeamSearchOutput:
    """The n-best list of every sentence, best first; also the beam search's internal pools."""

    tokens: jax.Array  # [batch, beam, max_decode_len] int32; eos kept, pad_id after it.
    token_log_probs: jax.Array  # [batch, beam, max_decode_len] float32; 0 after the end.
    lengths: jax.Array  # [batch, beam] int32; tokens up to and including eos.
    log_prob_sums: jax.Array  # [batch, beam] float32; sum of token_log_probs.
    scores: jax.Array  # [batch, beam] float32; length-penalised, sorted descending.
    top_ids: jax.Array  # [batch, beam, max_decode_len, num_top] int32; pad_id after the end.
    top_probs: jax.Array  # [batch, beam, max_decode_len, num_top] float32; 0 after the end.


@flax.struct.dataclass
class _Step:
    """What one greedy or sampling step emits for every row."""

    tokens: jax.Array  # [batch] int32
    token_log_probs: jax.Array  # [batch] float32
    top_ids: jax.Array  # [batch, num_top] int32
    top_probs: jax.Array  # [batch, num_top] float32


@flax.struct.dataclass
class _BeamState:
    """The `lax.while_loop` carry of beam search (with the step index)."""

    cache: Cache  # the callback's cache, rows = batch * beam.
    last_tokens: jax.Array  # [batch, beam] int32; latest token of each alive hypothesis.
    # Alive hypotheses rank by raw log-prob sum, so their `scores` equal `log_prob_sums`;
    # -inf marks a slot with no hypothesis (all but one slot at step 0).
    alive: BeamSearchOutput
    # The best `beam` finished hypotheses by penalised score; -inf marks an empty slot.
    finished: BeamSearchOutput
    done: jax.Array  # [batch] bool; the sentence's n-best list can no longer change.


def _log_softmax(logits: jax.Array) -> jax.Array:
    """[..., vocab] float logits -> [..., vocab] float32 log-probabilities."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _top_alternatives(log_probs: jax.Array, num_top: int) -> tuple[jax.Array, jax.Array]:
    """[..., vocab] log-probs -> ids [..., num_top] int32 and probabilities [..., num_top]."""
    if num_top == 0:
        # Empty arrays keep the output structure fixed without a top-k over the vocabulary.
        empty = log_probs.shape[:-1] + (0,)
        return jnp.zeros(empty, jnp.int32), jnp.zeros(empty, jnp.float32)
    # [..., vocab] -> [rows, vocab] -> [rows, num_top] -> [..., num_top]
    top_log_probs, top_ids = top_k_blocked(log_probs.reshape(-1, log_probs.shape[-1]), num_top)
    shape = (*log_probs.shape[:-1], num_top)
    return top_ids.reshape(shape).astype(jnp.int32), jnp.exp(top_log_probs).reshape(shape)


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


def _decode_rows(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    batch_size: int,
    max_decode_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_top: int,
) -> DecodeOutput:
    """One hypothesis per row; `choose(logits [batch, vocab], step) -> [batch]` picks tokens."""

    def step(carry: _RowsCarry, t: jax.Array) -> tuple[_RowsCarry, _Step]:
        # Ended rows feed their pad_id back; their logits are computed but not used.
        cache, last, finished = carry  # last, finished: [batch]
        logits, cache = tokens_to_logits(last[:, None], cache)  # [batch, 1] -> [batch, vocab]
        logits = logits.astype(jnp.float32)
        log_probs = _log_softmax(logits)
        tokens = jnp.where(finished, pad_id, choose(logits, t)).astype(jnp.int32)
        token_lp = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
        top_ids, top_probs = _top_alternatives(log_probs, num_top)  # [batch, num_top]
        out = _Step(
            tokens=tokens,
            token_log_probs=jnp.where(finished, 0.0, token_lp),
            top_ids=jnp.where(finished[:, None], pad_id, top_ids),
            top_probs=jnp.where(finished[:, None], 0.0, top_probs),
        )
        return (cache, tokens, finished | (tokens == eos_id)), out

    def running(state: tuple[_RowsCarry, _Step, jax.Array]) -> jax.Array:
        (_, _, finished), _, t = state
        return (t < max_decode_len) & ~jnp.all(finished)

    def body(state: tuple[_RowsCarry, _Step, jax.Array]) -> tuple[_RowsCarry, _Step, jax.Array]:
        carry, steps, t = state
        carry, out = step(carry, t)
        # Column t of each [batch, max_decode_len, ...] buffer, written in place.
        steps = jax.tree.map(lambda buf, x: buf.at[:, t].set(x), steps, out)
        return carry, steps, t + 1

    init = (
        cache,
        jnp.full((batch_size,), bos_id, jnp.int32),
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
        lengths=_lengths(steps.tokens, eos_id),
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
    *,
    batch_size: int,
    max_decode_len: int,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    num_top: int = 0,
) -> DecodeOutput:
    """Takes the most probable token at every step.

    A row ends at its first eos, or at `max_decode_len` without one; its score is the sum of
    its token log-probabilities either way. Once every row has ended the remaining steps skip
    the model call.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, rows = batch_size.
      batch_size: number of rows.
      max_decode_len: number of tokens to generate at most, eos included.
      bos_id, eos_id, pad_id: special token ids.
      num_top: number of alternatives to record per step (0 records none).

    Returns:
      A `DecodeOutput`; top_ids / top_probs are the `num_top` most probable tokens of the
      model's softmax at each step.
    """
    return _decode_rows(
        tokens_to_logits,
        cache,
        lambda logits, t: jnp.argmax(logits, axis=-1),
        batch_size=batch_size,
        max_decode_len=max_decode_len,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        num_top=num_top,
    )


def sample(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    rng: jax.Array,
    *,
    batch_size: int,
    max_decode_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    num_top: int = 0,
) -> DecodeOutput:
    """Samples each token from the model's distribution after `filter_logits`.

    Step t draws with `jax.random.fold_in(rng, t)`, so a step's draw does not depend on how
    many steps ran before it. Recorded log-probabilities and alternatives come from the
    model's own softmax (temperature 1, unfiltered), so they equal teacher-forced scores of
    the same tokens; the filtering only decides which token is drawn. top_k=1 is greedy.
    Ends and scores rows as `greedy_search` does.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, rows = batch_size.
      rng: a PRNG key.
      batch_size, max_decode_len, bos_id, eos_id, pad_id, num_top: as in `greedy_search`.
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
        batch_size=batch_size,
        max_decode_len=max_decode_len,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        num_top=num_top,
    )


def penalised_score(
    log_prob_sums: jax.Array, lengths: jax.Array, *, alpha: float, length_penalty: LengthPenalty
) -> jax.Array:
    """Length-normalised score of hypotheses; any matching shapes.

    "gnmt" (Wu et al. 2016): log_prob_sum / ((5 + length) / 6) ** alpha; alpha = 0 gives the
    raw sum. "plain": log_prob_sum / length ** alpha, the `length_penalty` of Hugging Face
    `generate`. Lengths count eos.
    """
    lengths = lengths.astype(jnp.float32)
    if length_penalty == "gnmt":
        return log_prob_sums / ((5.0 + lengths) / 6.0) ** alpha
    if length_penalty == "plain":
        return log_prob_sums / lengths**alpha
    raise ValueError(f"length_penalty must be 'gnmt' or 'plain', got {length_penalty!r}")


def reorder_cache(cache: Cache, parents: jax.Array) -> Cache:
    """Gathers the per-hypothesis cache leaves of the beams that survive a step.

    Args:
      cache: a pytree; leaves whose leading axis has size batch * beam (rows batch-major)
        are gathered, all others are returned unchanged.
      parents: [batch, beam] int; the beam each new hypothesis continues.

    Returns:
      The cache with the same structure and shapes.
    """
    batch, beam = parents.shape
    if beam == 1:
        return cache
    # Batch-major row indices: [batch, beam] -> [batch * beam].
    rows = (jnp.arange(batch)[:, None] * beam + parents).reshape(-1)

    def gather(leaf: jax.Array) -> jax.Array:
        if jnp.ndim(leaf) == 0 or leaf.shape[0] != batch * beam:
            return leaf
        return jnp.take(leaf, rows, axis=0)

    return jax.tree.map(gather, cache)


def _gather_beams(tree: Any, indices: jax.Array) -> Any:
    """Leaves [batch, n, ...] and indices [batch, k] -> leaves [batch, k, ...]."""
    return jax.tree.map(lambda x: jax.vmap(lambda xb, ib: xb[ib])(x, indices), tree)


def _write_step(x: jax.Array, value: jax.Array, step: jax.Array) -> jax.Array:
    """Writes value [batch, n, ...] into history x [batch, n, len, ...] at position step."""
    return lax.dynamic_update_index_in_dim(x, value, step, axis=2)


def _expand(
    alive: BeamSearchOutput,
    log_probs: jax.Array,
    step: jax.Array,
    num_top: int,
) -> tuple[BeamSearchOutput, jax.Array]:
    """The 2 * beam best one-token extensions of the alive hypotheses, best first.

    Two beams' worth guarantees `beam` candidates that do not end with eos, since each
    alive hypothesis contributes at most one eos extension.

    Args:
      alive: [batch, beam, ...] hypotheses.
      log_probs: [batch, beam, vocab] float32 next-token log-probabilities.
      step: scalar index of the token being chosen.
      num_top: alternatives to record.

    Returns:
      Candidates [batch, 2 * beam, ...] (scores equal log_prob_sums) and their parent beams
      [batch, 2 * beam].
    """
    batch, beam, vocab = log_probs.shape
    sums = alive.log_prob_sums[:, :, None] + log_probs  # [batch, beam, vocab]
    # [batch, beam, vocab] -> [batch, beam * vocab] -> [batch, 2 * beam]
    cand_sums, flat_ids = top_k_blocked(sums.reshape(batch, beam * vocab), 2 * beam)
    parents, tokens = flat_ids // vocab, (flat_ids % vocab).astype(jnp.int32)
    token_lp = jnp.take_along_axis(log_probs.reshape(batch, beam * vocab), flat_ids, axis=1)
    top_ids, top_probs = _top_alternatives(log_probs, num_top)  # [batch, beam, num_top]
    history = _gather_beams(alive, parents)  # [batch, beam, ...] -> [batch, 2 * beam, ...]
    candidates = BeamSearchOutput(
        tokens=_write_step(history.tokens, tokens, step),
        token_log_probs=_write_step(history.token_log_probs, token_lp, step),
        lengths=jnp.full(tokens.shape, step + 1, jnp.int32),
        log_prob_sums=cand_sums,
        scores=cand_sums,
        top_ids=_write_step(history.top_ids, _gather_beams(top_ids, parents), step),
        top_probs=_write_step(history.top_probs, _gather_beams(top_probs, parents), step),
    )
    return candidates, parents


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


def _select_alive(
    candidates: BeamSearchOutput, ending: jax.Array, beam: int
) -> tuple[BeamSearchOutput, jax.Array]:
    """Best `beam` candidates [batch, 2 * beam, ...] that do not end -> [batch, beam, ...].

    Returns the new alive hypotheses and their indices [batch, beam] into the candidates.
    """
    sums = jnp.where(ending, -jnp.inf, candidates.log_prob_sums)  # [batch, 2 * beam]
    sums, indices = lax.top_k(sums, beam)  # [batch, beam]
    alive = _gather_beams(candidates, indices).replace(log_prob_sums=sums, scores=sums)
    return alive, indices


def _merge_finished(
    finished: BeamSearchOutput, candidates: BeamSearchOutput, new: jax.Array, scores: jax.Array
) -> BeamSearchOutput:
    """Keeps the best `beam` of the finished pool and the `new` [batch, 2 * beam] candidates.

    The pool goes first in the merge, and `lax.top_k` prefers lower indices on ties, so empty
    slots (-inf) stay the pool's own empty slots: pad tokens, length 0.
    """
    beam = finished.scores.shape[1]
    candidates = candidates.replace(scores=jnp.where(new, scores, -jnp.inf))
    # [batch, beam + 2 * beam, ...]
    merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), finished, candidates)
    _, keep = lax.top_k(merged.scores, beam)  # [batch, beam], best first
    return _gather_beams(merged, keep)


def _can_stop(
    finished: BeamSearchOutput,
    alive: BeamSearchOutput,
    step: jax.Array,
    max_decode_len: int,
    score: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """[batch] bool: no extension of an alive hypothesis can enter the finished pool.

    Alive hypotheses have step + 1 tokens, so extensions have step + 2 to max_decode_len;
    `beam_search` says why the larger score at the two ends bounds theirs.
    """
    best = alive.log_prob_sums.max(axis=-1)  # [batch]
    shortest = jnp.minimum(step + 2, max_decode_len)
    bound = jnp.maximum(score(best, shortest), score(best, jnp.asarray(max_decode_len)))
    worst = finished.scores.min(axis=-1)  # [batch]
    return worst >= bound


def _beam_step(
    state: _BeamState,
    step: jax.Array,
    tokens_to_logits: TokensToLogits,
    score: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    max_decode_len: int,
    eos_id: int,
    num_top: int,
) -> _BeamState:
    """Extends every alive hypothesis by one token; see `beam_search` for the rules."""
    batch, beam = state.last_tokens.shape
    ids = state.last_tokens.reshape(batch * beam, 1)  # [batch, beam] -> [batch * beam, 1]
    logits, cache = tokens_to_logits(ids, state.cache)
    # [batch * beam, vocab] -> [batch, beam, vocab]
    log_probs = _log_softmax(logits).reshape(batch, beam, -1)
    candidates, parents = _expand(state.alive, log_probs, step, num_top)
    last_tokens = lax.dynamic_index_in_dim(candidates.tokens, step, axis=2, keepdims=False)
    ending = (last_tokens == eos_id) | (step == max_decode_len - 1)  # [batch, 2 * beam]
    # Only the best `beam` candidates may finish, as in Hugging Face and fairseq: the rest
    # exist so that `beam` hypotheses stay alive.
    new = ending & (jnp.arange(2 * beam) < beam)
    finished = _merge_finished(
        state.finished, candidates, new, score(candidates.log_prob_sums, candidates.lengths)
    )
    alive, indices = _select_alive(candidates, ending, beam)
    return _BeamState(
        cache=reorder_cache(cache, jnp.take_along_axis(parents, indices, axis=1)),
        last_tokens=jnp.take_along_axis(last_tokens, indices, axis=1),
        alive=alive,
        finished=finished,
        done=state.done | _can_stop(finished, alive, step, max_decode_len, score),
    )


def _empty_hypotheses(
    batch: int, beam: int, max_decode_len: int, num_top: int, pad_id: int, sums: jax.Array
) -> BeamSearchOutput:
    """[batch, beam, ...] hypotheses with no tokens and log-prob sums `sums` [batch, beam]."""
    return BeamSearchOutput(
        tokens=jnp.full((batch, beam, max_decode_len), pad_id, jnp.int32),
        token_log_probs=jnp.zeros((batch, beam, max_decode_len), jnp.float32),
        lengths=jnp.zeros((batch, beam), jnp.int32),
        log_prob_sums=sums,
        scores=sums,
        top_ids=jnp.full((batch, beam, max_decode_len, num_top), pad_id, jnp.int32),
        top_probs=jnp.zeros((batch, beam, max_decode_len, num_top), jnp.float32),
    )


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    *,
    batch_size: int,
    beam_size: int,
    max_decode_len: int,
    alpha: float = 0.6,
    length_penalty: LengthPenalty = "gnmt",
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    num_top: int = 0,
) -> BeamSearchOutput:
    """Beam search with the beams folded into the batch; returns each sentence's n-best list.

    Each step extends the `beam` alive hypotheses of a sentence by every token and keeps the
    2 * beam best extensions by raw log-prob sum. Of these, the ones among the best `beam`
    that end (with eos, or by reaching `max_decode_len`) enter the sentence's pool of
    finished hypotheses, scored by `penalised_score` with the length counting eos; the pool
    keeps the best `beam`. The best `beam` that do not end stay alive, and the cache is
    reordered to them (see the module's callback notes: only leaves of leading size
    batch * beam move). A hypothesis with no eos within `max_decode_len` ends there, with
    length max_decode_len and the same penalised score of its max_decode_len log-probs.

    Early stopping: a sentence stops once its worst finished score (-inf while the pool has a
    free slot) is >= the best score that any finished extension of its alive hypotheses
    could reach. With S the best alive log-prob sum and t the alive length, that bound is
    max(score(S, t + 1), score(S, max_decode_len)): an extension has log-prob sum S' <= S,
    since log-probs are <= 0, and length n in [t + 1, max_decode_len], so its score is
    S' / penalty(n) <= S / penalty(n). Both penalties, ((5 + n) / 6) ** alpha and
    n ** alpha, are positive and monotone in n for any alpha, so S / penalty(n) with S <= 0
    is monotone in n and peaks at an end of the range (at max_decode_len when alpha >= 0).
    Because it is a true bound, stopping never changes the n-best list, it only saves
    steps; once every sentence has stopped the remaining steps skip the model call. A
    stopped sentence's rows still pass through the model while other sentences run.

    With length_penalty="plain" this is Hugging Face `generate(num_beams=beam_size,
    length_penalty=alpha, early_stopping="never", max_new_tokens=max_decode_len)`, whose
    bound is also a true one. Its default early_stopping=False bounds with the current
    length, which is not a bound for alpha > 0, and may stop sooner with another n-best.

    Args:
      tokens_to_logits: the callback described at the top of this module.
      cache: its cache, rows = batch_size * beam_size, batch-major.
      batch_size: number of sentences.
      beam_size: hypotheses kept per sentence, alive and finished.
      max_decode_len: number of tokens to generate at most, eos included.
      alpha: length-penalty exponent; 0 ranks by raw log-prob sum.
      length_penalty: "gnmt" or "plain"; see `penalised_score`.
      bos_id, eos_id, pad_id: special token ids.
      num_top: alternatives to record per step, from the model's softmax (0 records none).

    Returns:
      A `BeamSearchOutput` with the n-best list sorted by score. A slot with score -inf is
      empty (fewer than beam_size distinct hypotheses exist): pad tokens, length 0.
    """

    def score(sums: jax.Array, lengths: jax.Array) -> jax.Array:
        return penalised_score(sums, lengths, alpha=alpha, length_penalty=length_penalty)

    def running(carry: tuple[_BeamState, jax.Array]) -> jax.Array:
        state, step = carry
        return (step < max_decode_len) & ~jnp.all(state.done)

    def body(carry: tuple[_BeamState, jax.Array]) -> tuple[_BeamState, jax.Array]:
        state, step = carry
        state = _beam_step(
            state,
            step,
            tokens_to_logits,
            score,
            max_decode_len=max_decode_len,
            eos_id=eos_id,
            num_top=num_top,
        )
        return state, step + 1

    # Only the first slot starts alive, so step 0 does not expand beam copies of bos.
    alive_sums = jnp.full((batch_size, beam_size), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    empty = functools.partial(_empty_hypotheses, batch_size, beam_size, max_decode_len, num_top)
    init = _BeamState(
        cache=cache,
        last_tokens=jnp.full((batch_size, beam_size), bos_id, jnp.int32),
        alive=empty(pad_id, alive_sums),
        finished=empty(pad_id, jnp.full_like(alive_sums, -jnp.inf)),
        done=jnp.zeros((batch_size,), jnp.bool_),
    )
    # A while loop, not a scan with a skipping cond: no step writes per-step outputs, and a
    # cond around the step made XLA copy the whole cache (its operand) at every step.
    state, _ = lax.while_loop(running, body, (init, jnp.zeros((), jnp.int32)))
    return state.finished


def target_log_probs(logits: jax.Array, targets: jax.Array, *, pad_id: int = 0) -> jax.Array:
    """Teacher-forced log-probabilities of given targets.

    Args:
      logits: [batch, len, vocab] float; position i predicts targets[:, i].
      targets: [batch, len] int; pad_id marks padding.

    Returns:
      [batch, len] float32 log p(targets), 0 at padding; sum over len for a sequence score.
    """
    log_probs = _log_softmax(logits)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [batch, len]
    return jnp.where(targets != pad_id, picked, 0.0)
