"""Beam search over the decoders' logits callback: n-best lists, length penalties, cache reorder."""

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
from jax import lax

from tfjax.decode import (
    Cache,
    DecodeSpec,
    TokensToLogits,
    log_softmax,
    top_alternatives,
    top_k_blocked,
)

LengthPenalty = Literal["gnmt", "plain"]
# True: a sentence stops once its finished pool is full; "never": once no alive hypothesis can
# enter it (see `beam_search`). Hugging Face's heuristic False is not offered.
EarlyStopping = Literal[True, "never"]


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

    See the cache notes at the top of `tfjax.decode` for which leaves these are in a model.

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
    top_ids, top_probs = top_alternatives(log_probs, num_top)  # [batch, beam, num_top]
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
    spec: DecodeSpec,
    *,
    max_decode_len: int,
    early_stopping: EarlyStopping,
) -> _BeamState:
    """Extends every alive hypothesis by one token; see `beam_search` for the rules."""
    batch, beam = state.last_tokens.shape
    ids = state.last_tokens.reshape(batch * beam, 1)  # [batch, beam] -> [batch * beam, 1]
    logits, cache = tokens_to_logits(ids, state.cache)  # [batch * beam, vocab]
    # [batch * beam, vocab] -> [batch, beam, vocab]
    # Row b * beam + k of the logits continues alive[b, k]: its own tokens are its history.
    history = state.alive.tokens.reshape(batch * beam, -1)  # [batch * beam, max_decode_len]
    log_probs = log_softmax(spec.next_logits(logits, step, history)).reshape(batch, beam, -1)
    candidates, parents = _expand(state.alive, log_probs, step, spec.num_top)
    last_tokens = lax.dynamic_index_in_dim(candidates.tokens, step, axis=2, keepdims=False)
    ending = (last_tokens == spec.eos_id) | (step == max_decode_len - 1)  # [batch, 2 * beam]
    # Only the best `beam` candidates may finish, as in Hugging Face and fairseq: the rest
    # exist so that `beam` hypotheses stay alive. A stopped sentence's pool is frozen, so its
    # n-best list does not depend on how long other sentences run (with "never" nothing
    # could enter it anyway).
    new = ending & (jnp.arange(2 * beam) < beam) & ~state.done[:, None]  # [batch, 2 * beam]
    finished = _merge_finished(
        state.finished, candidates, new, score(candidates.log_prob_sums, candidates.lengths)
    )
    alive, indices = _select_alive(candidates, ending, beam)
    done = state.done | _can_stop(finished, alive, step, max_decode_len, score)
    if early_stopping is True:
        done = done | jnp.all(finished.scores > -jnp.inf, axis=-1)  # a full pool
    return _BeamState(
        cache=reorder_cache(cache, jnp.take_along_axis(parents, indices, axis=1)),
        last_tokens=jnp.take_along_axis(last_tokens, indices, axis=1),
        alive=alive,
        finished=finished,
        done=done,
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
    spec: DecodeSpec,
    *,
    batch_size: int,
    beam_size: int,
    max_decode_len: int,
    alpha: float = 0.6,
    length_penalty: LengthPenalty = "gnmt",
    early_stopping: EarlyStopping = "never",
) -> BeamSearchOutput:
    """Beam search with the beams folded into the batch; returns each sentence's n-best list.

    Each step extends the `beam` alive hypotheses of a sentence by every token, scored by
    the log-softmax of the spec's processed logits, and keeps the 2 * beam best extensions
    by raw log-prob sum. Of these, the ones among the best `beam` that end (with eos, or by
    reaching `max_decode_len`) enter the sentence's pool of finished hypotheses, scored by
    `penalised_score` with the length counting eos; the pool keeps the best `beam`. The best
    `beam` that do not end stay alive, and `reorder_cache` moves the cache's per-hypothesis
    leaves to them (see the cache notes at the top of `tfjax.decode`). A hypothesis with no
    eos within `max_decode_len` ends there, with length max_decode_len and the same
    penalised score of its max_decode_len log-probs.

    Early stopping, early_stopping="never" (the default): a sentence stops once its worst
    finished score (-inf while the pool has a free slot) is >= the best score that any
    finished extension of its alive hypotheses could reach. With S the best alive log-prob
    sum and t the alive length, that bound is max(score(S, t + 1), score(S, max_decode_len)):
    an extension has log-prob sum S' <= S, since log-probs are <= 0, and length n in
    [t + 1, max_decode_len], so its score is S' / penalty(n) <= S / penalty(n). Both
    penalties, ((5 + n) / 6) ** alpha and n ** alpha, are positive and monotone in n for any
    alpha, so S / penalty(n) with S <= 0 is monotone in n and peaks at an end of the range
    (at max_decode_len when alpha >= 0).
    Because it is a true bound, stopping never changes the n-best list, it only saves
    steps: the loop stops once every sentence has stopped, so no model call is made for
    steps after that. A stopped sentence's rows still pass through the model while other
    sentences run; its pool no longer changes.

    early_stopping=True, Hugging Face's `early_stopping=True`: a sentence stops as soon as its
    pool holds `beam_size` finished hypotheses (or, as above, when nothing can enter it),
    however much better an alive hypothesis might still end. Fewer steps, and possibly
    another n-best list. Hugging Face's early_stopping=False, a heuristic between the two, is
    not offered.

    The spec's min_length and no_repeat_ngram_size apply to each alive hypothesis with its
    own tokens as history (hypotheses change beams every step); see `tfjax.decode.DecodeSpec`.

    With length_penalty="plain" this is Hugging Face `generate(num_beams=beam_size,
    length_penalty=alpha, early_stopping="never", max_new_tokens=max_decode_len)`, whose
    bound is also a true one. Its default early_stopping=False bounds with the current
    length, which is not a bound for alpha > 0, and may stop sooner with another n-best.

    Args:
      tokens_to_logits: the callback described at the top of `tfjax.decode`.
      cache: its cache, rows = batch_size * beam_size, batch-major.
      spec: special ids, alternatives to record per step (from the processed softmax), and
        the logits processor.
      batch_size: number of sentences.
      beam_size: hypotheses kept per sentence, alive and finished.
      max_decode_len: number of tokens to generate at most, eos included.
      alpha: length-penalty exponent; 0 ranks by raw log-prob sum.
      length_penalty: "gnmt" or "plain"; see `penalised_score`.
      early_stopping: "never" or True; see above.

    Returns:
      A `BeamSearchOutput` with the n-best list sorted by score. A slot with score -inf is
      empty (fewer than beam_size distinct hypotheses exist): pad tokens, length 0.
    """

    if early_stopping is not True and early_stopping != "never":
        raise ValueError(f"early_stopping must be True or 'never', got {early_stopping!r}")

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
            spec,
            max_decode_len=max_decode_len,
            early_stopping=early_stopping,
        )
        return state, step + 1

    # Only the first slot starts alive, so step 0 does not expand beam copies of bos.
    alive_sums = jnp.full((batch_size, beam_size), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    empty = functools.partial(
        _empty_hypotheses, batch_size, beam_size, max_decode_len, spec.num_top, spec.pad_id
    )
    init = _BeamState(
        cache=cache,
        last_tokens=jnp.full((batch_size, beam_size), spec.bos_id, jnp.int32),
        alive=empty(alive_sums),
        finished=empty(jnp.full_like(alive_sums, -jnp.inf)),
        done=jnp.zeros((batch_size,), jnp.bool_),
    )
    # A while loop, not a scan with a skipping cond: no step writes per-step outputs, and a
    # cond around the step made XLA copy the whole cache (its operand) at every step.
    state, _ = lax.while_loop(running, body, (init, jnp.zeros((), jnp.int32)))
    return state.finished
