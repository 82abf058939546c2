"""The glue between the model and the decoders: encode once, build the cache, decode, score."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tfjax import decode
from tfjax.model import Transformer

Params = Any  # the "params" collection of a Transformer, unboxed
# An optional rewrite of the next-token logits before the decoder sees them:
#   processor(logits [rows, vocab] float32, step [] int32) -> [rows, vocab] float32,
# where step is the index of the token being chosen (0 for the one after bos). The decoders
# take the log-softmax of what it returns, so banning a token (-inf) renormalises the rest;
# recorded log-probabilities are those of the processed distribution. Processors are static
# jit arguments: pass the same object to reuse a compilation.
LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]
# The decoders' callback cache: the model's "cache" collection plus our own step counter,
# a scalar, which beam search leaves in place (see decode.py's cache-leaf rule).
_Cache = dict[str, Any]


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


def init_cache(
    model: Transformer, params: Params, inputs: jax.Array, beam: int, max_decode_len: int
) -> _Cache:
    """Encodes inputs [B, S] once and fills the cache for rows = B * beam, batch-major."""
    variables = {"params": params}
    encoded = model.apply(variables, inputs, method=model.encode)  # [B, S, D]
    _, state = model.apply(
        variables,
        encoded,
        inputs,
        inputs.shape[0] * beam,
        max_decode_len,
        method=model.init_cache,
        mutable=["cache"],
    )
    return {"model": state["cache"], "step": jnp.zeros((), jnp.int32)}


def _tokens_to_logits(
    model: Transformer, params: Params, processor: LogitsProcessor | None
) -> decode.TokensToLogits:
    """The decoders' callback: ids [rows, 1] and cache -> logits [rows, V] and new cache."""

    def tokens_to_logits(ids: jax.Array, cache: _Cache) -> tuple[jax.Array, _Cache]:
        logits, state = model.apply(
            {"params": params, "cache": cache["model"]},
            ids,
            method=model.decode_step,
            mutable=["cache"],
        )  # [rows, V]
        step = cache["step"]
        if processor is not None:
            logits = processor(logits.astype(jnp.float32), step)
        return logits, {"model": state["cache"], "step": step + 1}

    return tokens_to_logits


_STATIC = ("model", "max_decode_len", "bos_id", "eos_id", "pad_id", "num_top", "logits_processor")


@functools.partial(jax.jit, static_argnames=_STATIC)
def translate_greedy(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    *,
    max_decode_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_top: int = 0,
    logits_processor: LogitsProcessor | None = None,
) -> decode.DecodeOutput:
    """Greedy translation of a source batch; see `decode.greedy_search`.

    Args:
      model: the Transformer; its config's pad_id masks source padding.
      params: its "params" collection.
      inputs: [B, S] int source ids.
      max_decode_len: tokens to generate at most, eos included (<= the config's max_len).
      bos_id, eos_id: target start and end ids.
      pad_id: written after a row's eos in the output.
      num_top: alternatives to record per step.
      logits_processor: optional; see `LogitsProcessor`.

    Returns:
      A `decode.DecodeOutput` with [B, max_decode_len] tokens.
    """
    return decode.greedy_search(
        _tokens_to_logits(model, params, logits_processor),
        init_cache(model, params, inputs, 1, max_decode_len),
        batch_size=inputs.shape[0],
        max_decode_len=max_decode_len,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        num_top=num_top,
    )


@functools.partial(jax.jit, static_argnames=(*_STATIC, "temperature", "top_k", "top_p"))
def translate_sample(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    rng: jax.Array,
    *,
    max_decode_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_top: int = 0,
    logits_processor: LogitsProcessor | None = None,
) -> decode.DecodeOutput:
    """Sampled translation of a source batch; see `decode.sample`.

    The processor runs before `decode.filter_logits`; recorded log-probabilities are those of
    the processed, unfiltered distribution. Other arguments as in `translate_greedy`, plus
    rng (a PRNG key) and temperature, top_k, top_p (see `decode.filter_logits`).
    """
    return decode.sample(
        _tokens_to_logits(model, params, logits_processor),
        init_cache(model, params, inputs, 1, max_decode_len),
        rng,
        batch_size=inputs.shape[0],
        max_decode_len=max_decode_len,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        num_top=num_top,
    )


@functools.partial(jax.jit, static_argnames=(*_STATIC, "beam_size", "alpha", "length_penalty"))
def translate_beam(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    *,
    max_decode_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int,
    alpha: float = 0.6,
    length_penalty: decode.LengthPenalty = "gnmt",
    num_top: int = 0,
    logits_processor: LogitsProcessor | None = None,
) -> decode.BeamSearchOutput:
    """Beam-search translation of a source batch; see `decode.beam_search`.

    The cache holds B * beam_size rows of self-attention keys and values but one copy of
    each sentence's encoder-decoder keys and values. Other arguments as in
    `translate_greedy`, plus beam_size, alpha and length_penalty (see `decode.beam_search`).

    Returns:
      A `decode.BeamSearchOutput`: each sentence's n-best list [B, beam_size, ...].
    """
    return decode.beam_search(
        _tokens_to_logits(model, params, logits_processor),
        init_cache(model, params, inputs, beam_size, max_decode_len),
        batch_size=inputs.shape[0],
        beam_size=beam_size,
        max_decode_len=max_decode_len,
        alpha=alpha,
        length_penalty=length_penalty,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        num_top=num_top,
    )


@functools.partial(jax.jit, static_argnames=("model", "bos_id", "pad_id", "logits_processor"))
def score(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    bos_id: int,
    pad_id: int,
    logits_processor: LogitsProcessor | None = None,
) -> jax.Array:
    """Teacher-forced log-probabilities of given targets; see `decode.target_log_probs`.

    Args:
      model, params: as in `translate_greedy`.
      inputs: [B, S] int source ids.
      targets: [B, T] int target ids, eos included, pad_id after the end.
      bos_id: the decoder's start id; the decoder sees bos + targets[:, :-1].
      pad_id: target padding, scored 0 wherever it occurs. The decoders treat pad_id as an
        ordinary token, so to re-score their outputs exactly, decode with
        `ban_tokens([pad_id])` (Marian's setting) and pass the same processor here.
      logits_processor: applied at every position t as at decode step t, so scoring a
        decoder's output with its processor gives back its token log-probabilities.

    Returns:
      [B, T] float32 log p(targets[:, t] | source, bos, targets[:, :t]); 0 at padding.
    """
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=bos_id)  # [B, T]
    logits = model.apply({"params": params}, inputs, decoder_inputs)  # [B, T, V]
    if logits_processor is not None:
        steps = jnp.arange(targets.shape[1])  # [T]
        logits = jax.vmap(logits_processor, in_axes=(1, 0), out_axes=1)(logits, steps)
    return decode.target_log_probs(logits, targets, pad_id=pad_id)
