"""The decoders bound to the model (encode, cache, decode, score, rows over devices); the policy."""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tfjax import beam_search, decode
from tfjax.data import BOS_ID, EOS_ID, PAD_ID
from tfjax.model import Transformer

Params = Any  # the "params" collection of a Transformer, unboxed
Cache = dict[str, Any]  # the Transformer's "cache" collection, the decoders' callback cache

# Pad and bos are never a correct next token; banning them (and renormalising) keeps decoded
# outputs re-scorable by `score`, which reads pad as the end of a target. One object, so the
# jitted decoders see an equal spec, and reuse their compilation, every call.
NEVER_EMIT = decode.ban_tokens((PAD_ID, BOS_ID))


def translation_spec(num_top: int = 0) -> decode.DecodeSpec:
    """The spec of every translation with a tfjax tokenizer: its special ids, `NEVER_EMIT`."""
    return decode.DecodeSpec(
        bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, num_top=num_top, logits_processor=NEVER_EMIT
    )


def init_cache(
    model: Transformer, params: Params, inputs: jax.Array, beam: int, max_decode_len: int
) -> Cache:
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
    return state["cache"]


def _tokens_to_logits(model: Transformer, params: Params) -> decode.TokensToLogits:
    """The decoders' callback: ids [rows, 1] and cache -> logits [rows, V] and new cache.

    The model's cache keeps its own position (`index`); the decoders give the step index to
    the spec's logits processor, so the callback needs no counter of its own.
    """

    def tokens_to_logits(ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, state = model.apply(
            {"params": params, "cache": cache},
            ids,
            method=model.decode_step,
            mutable=["cache"],
        )  # [rows, V]
        return logits, state["cache"]

    return tokens_to_logits


_STATIC = ("model", "spec", "max_decode_len")


@functools.partial(jax.jit, static_argnames=_STATIC)
def translate_greedy(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    spec: decode.DecodeSpec,
    *,
    max_decode_len: int,
) -> decode.DecodeOutput:
    """Greedy translation of a source batch; see `decode.greedy_search`.

    Args:
      model: the Transformer; its config's pad_id masks source padding.
      params: its "params" collection.
      inputs: [B, S] int source ids.
      spec: target special ids, alternatives to record, logits processor; for a tfjax
        tokenizer, `translation_spec()`.
      max_decode_len: tokens to generate at most, eos included (<= the config's max_len).

    Returns:
      A `decode.DecodeOutput` with [B, max_decode_len] tokens.
    """
    return decode.greedy_search(
        _tokens_to_logits(model, params),
        init_cache(model, params, inputs, 1, max_decode_len),
        spec,
        batch_size=inputs.shape[0],
        max_decode_len=max_decode_len,
    )


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "source_len"))
def rolling_rows(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    *,
    max_decode_len: int,
    source_len: int,
) -> Cache:
    """Fresh rows of a rolling cache (`tfjax.continuous`), one per source sentence.

    Encoded, and their cross-attention keys and values projected, at their own length S;
    then the source axis of the cache is padded to `source_len`, the source length of the
    running batch the rows join (its cache leaves must have equal shapes): the padding is
    masked as any source padding is, and neither the encoder nor the projections run over it.

    Args:
      model, params: as in `translate_greedy`.
      inputs: [n, S] int source ids, S <= source_len.
      max_decode_len: the running batch's L, the longest translation.
      source_len: the running batch's S.

    Returns:
      The cache of n rows, each at its position 0.
    """
    variables = {"params": params}
    encoded = model.apply(variables, inputs, method=model.encode)  # [n, S, D]
    _, state = model.apply(
        variables,
        encoded,
        inputs,
        inputs.shape[0],
        max_decode_len,
        True,
        method=model.init_cache,
        mutable=["cache"],
    )
    return _pad_source(state["cache"], source_len)


def _pad_source(cache: Cache, source_len: int) -> Cache:
    """The source axis S of a decode cache padded to `source_len`: the last axis of the
    cross-attention keys and values [n, H, K, S] and of the source mask [n, 1, 1, S] (padded
    with False: masked)."""

    def pad(path: tuple, x: jax.Array) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if "cross_attention" not in name and "source_mask" not in name:
            return x
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, source_len - x.shape[-1])])

    return jax.tree_util.tree_map_with_path(pad, cache)


@functools.partial(jax.jit, static_argnames=("model", "spec", "num_steps"), donate_argnames="cache")
def rolling_steps(
    model: Transformer,
    params: Params,
    cache: Cache,
    last: jax.Array,
    steps: jax.Array,
    spec: decode.DecodeSpec,
    num_steps: int,
) -> tuple[Cache, Any]:
    """`num_steps` steps of every row of a rolling cache; see `decode.greedy_steps`."""
    return decode.greedy_steps(
        _tokens_to_logits(model, params), cache, last, steps, spec, num_steps
    )


@functools.partial(jax.jit, static_argnames=(*_STATIC, "temperature", "top_k", "top_p"))
def translate_sample(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    rng: jax.Array,
    spec: decode.DecodeSpec,
    *,
    max_decode_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> decode.DecodeOutput:
    """Sampled translation of a source batch; see `decode.sample`.

    The spec's processor runs before `decode.filter_logits`; recorded log-probabilities are
    those of the processed, unfiltered distribution. Other arguments as in
    `translate_greedy`, plus rng (a PRNG key) and temperature, top_k, top_p (see
    `decode.filter_logits`).
    """
    return decode.sample(
        _tokens_to_logits(model, params),
        init_cache(model, params, inputs, 1, max_decode_len),
        rng,
        spec,
        batch_size=inputs.shape[0],
        max_decode_len=max_decode_len,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


@functools.partial(
    jax.jit, static_argnames=(*_STATIC, "beam_size", "alpha", "length_penalty", "early_stopping")
)
def translate_beam(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    spec: decode.DecodeSpec,
    *,
    max_decode_len: int,
    beam_size: int,
    alpha: float = 0.6,
    length_penalty: beam_search.LengthPenalty = "gnmt",
    early_stopping: beam_search.EarlyStopping = "never",
) -> beam_search.BeamSearchOutput:
    """Beam-search translation of a source batch; see `beam_search.beam_search`.

    The cache holds one copy of each sentence's keys and values, self-attention with a slot
    per beam, and a per-hypothesis origin table that beam search reorders (see
    `tfjax.model`). Other arguments as in `translate_greedy`, plus beam_size, alpha,
    length_penalty and early_stopping (see `beam_search.beam_search`).

    Returns:
      A `beam_search.BeamSearchOutput`: each sentence's n-best list [B, beam_size, ...].
    """
    return beam_search.beam_search(
        _tokens_to_logits(model, params),
        init_cache(model, params, inputs, beam_size, max_decode_len),
        spec,
        batch_size=inputs.shape[0],
        beam_size=beam_size,
        max_decode_len=max_decode_len,
        alpha=alpha,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def score(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    spec: decode.DecodeSpec,
) -> jax.Array:
    """Teacher-forced log-probabilities of given targets; see `decode.target_log_probs`.

    Args:
      model, params: as in `translate_greedy`.
      inputs: [B, S] int source ids.
      targets: [B, T] int target ids, eos included, pad_id after the end.
      spec: the decoder's; uses bos_id (the decoder sees bos + targets[:, :-1]), pad_id
        (target padding, scored 0 wherever it occurs) and its controls and logits processor
        (`DecodeSpec.next_logits`), applied at every position t as at decode step t. So
        scoring a decoder's output with its spec gives back its token log-probabilities.
        The decoders treat pad_id as an ordinary token, so to re-score their outputs
        exactly, decode with a processor that bans it (Marian's setting;
        `translation_spec` does).

    Returns:
      [B, T] float32 log p(targets[:, t] | source, bos, targets[:, :t]); 0 at padding.
    """
    logits = model.apply({"params": params}, inputs, _shifted(targets, spec.bos_id))  # [B, T, V]
    # Position t is processed as decode step t, with the targets as the tokens before it.
    process = functools.partial(spec.next_logits, history=targets)
    steps = jnp.arange(targets.shape[1])  # [T]
    logits = jax.vmap(process, in_axes=(1, 0), out_axes=1)(logits, steps)  # [B, T, V]
    return decode.target_log_probs(logits, targets, pad_id=spec.pad_id)


def _shifted(targets: jax.Array, bos_id: int) -> jax.Array:
    """The decoder's teacher-forced inputs: bos, then targets [B, T] shifted right -> [B, T]."""
    return jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=bos_id)


@flax.struct.dataclass
class AttentionWeights:
    """Attention probabilities of a teacher-forced pass, float32, stacked over layers.

    Row t of `decoder_self` and `cross` is the decoder's attention while predicting
    targets[:, t] (its input there is bos or targets[:, t - 1]).
    """

    encoder: jax.Array  # [B, encoder layers, H, S, S] encoder self-attention
    decoder_self: jax.Array  # [B, decoder layers, H, T, T] causal: 0 above the diagonal
    cross: jax.Array  # [B, decoder layers, H, T, S] encoder–decoder attention


@functools.partial(jax.jit, static_argnames=("model", "bos_id"))
def attention_weights(
    model: Transformer,
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    bos_id: int = BOS_ID,
) -> AttentionWeights:
    """Every layer's and head's attention probabilities over given targets, teacher-forced.

    The decoder is causal and deterministic, so for a decoder's own output (greedy's, or the
    chosen beam's) these are, row by row, the weights its decode steps used. The pass applies
    the model with mutable=["intermediates"], which switches `Attention` to its recording
    path; nothing else compiles differently.

    Args:
      model, params: as in `translate_greedy`.
      inputs: [B, S] int source ids; pad_id positions get weight 0.
      targets: [B, T] int target ids, eos included, pad_id after the end; the decoder sees
        bos_id + targets[:, :-1], as in `score`.
      bos_id: the decoder's start token.

    Returns:
      An `AttentionWeights` of [B, layers, H, ...] arrays.
    """
    _, state = model.apply(
        {"params": params}, inputs, _shifted(targets, bos_id), mutable=["intermediates"]
    )
    recorded = state["intermediates"]
    cfg = model.config

    def stacked(stack: str, layers: int, sublayer: str) -> jax.Array:
        # Each layer sows once per pass: the tuple `sow` appends to holds one [B, H, ., .].
        per_layer = [recorded[stack][f"layer_{i}"][sublayer]["weights"][0] for i in range(layers)]
        return jnp.stack(per_layer, axis=1)  # [B, layers, H, ., .]

    return AttentionWeights(
        encoder=stacked("encoder", cfg.num_layers, "self_attention"),
        decoder_self=stacked("decoder", cfg.decoder_layers, "self_attention"),
        cross=stacked("decoder", cfg.decoder_layers, "cross_attention"),
    )


def to_host(tree: Any) -> Any:
    """Device arrays -> NumPy. An array spread over several processes' devices (a batch on a
    multi-host mesh) is gathered, whole, on every process."""

    def fetch(x: jax.Array | np.ndarray) -> np.ndarray:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree_util.tree_map(fetch, tree)


@dataclasses.dataclass(frozen=True)
class Replicas:
    """One copy of a model's parameters on each of several devices, for `decode_best` to
    decode a batch's rows in blocks, one block a device, all dispatched before any is awaited.

    On a CPU split into host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N),
    each block runs on its own thread: XLA:CPU's own threads gain little on the small
    products of a decode step, so for beam search two blocks of 16 sentences beat one batch
    of 32; greedy's blocks of 16 rows gained on an AVX-512 VM and lost on an AVX2-only one
    (README, decoding against CTranslate2).
    """

    copies: tuple[Params, ...]  # one per device; a block's host rows follow its copy there

    @classmethod
    def of(cls, params: Params, devices: Sequence[jax.Device]) -> "Replicas":
        """`params` copied onto each of `devices`."""
        return cls(tuple(jax.device_put(params, d) for d in devices))

    def blocks(self, rows: int) -> int:
        """How many blocks `rows` rows go in: the most devices that divide them evenly, so
        that every block has one shape (one compiled program)."""
        return max(n for n in range(1, len(self.copies) + 1) if rows % n == 0)


def decode_best(
    model: Transformer,
    params: Params | Replicas,
    inputs: np.ndarray,
    *,
    max_decode_len: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    num_top: int = 0,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
    early_stopping: beam_search.EarlyStopping = "never",
) -> Any:
    """Each sentence's best translation of a source batch [B, S], fetched to the host
    (`to_host`: a batch placed on a multi-host mesh comes back whole on every process).

    Decodes with `translation_spec(num_top)` and the given min_length and
    no_repeat_ngram_size (see `decode.DecodeSpec`): greedy (a `decode.DecodeOutput`) when
    beam_size == 1; otherwise the first of each n-best list: a
    `beam_search.BeamSearchOutput` with the beam axis dropped ([B, beam, ...] -> [B, ...]).
    early_stopping is beam search's (see `beam_search.beam_search`). With `Replicas`, the
    rows are decoded in consecutive blocks, one per device (see `Replicas.blocks`), and
    joined: the same output, row for row.
    """
    spec = dataclasses.replace(
        translation_spec(num_top),
        min_length=min_length,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    options = dict(max_decode_len=max_decode_len, beam_size=beam_size, alpha=alpha)
    best = functools.partial(_best, model, spec=spec, early_stopping=early_stopping, **options)
    if isinstance(params, Replicas):
        return over_devices(best, params, inputs)
    return to_host(best(params, inputs))


def over_devices(decoder: Callable[[Params, Any], Any], replicas: Replicas, inputs: Any) -> Any:
    """`decoder(params, inputs [b, S]) -> output [b, ...]` run on consecutive row blocks of
    inputs [B, S], one block per device of `replicas` (`Replicas.blocks`), every block
    dispatched before any is fetched; the outputs, fetched to the host, joined: [B, ...]."""
    blocks = np.split(np.asarray(inputs), replicas.blocks(len(inputs)))  # n x [B / n, S]
    # Host arrays are uncommitted: jit runs each block where its committed copy lives.
    outs = [decoder(copy, block) for copy, block in zip(replicas.copies, blocks, strict=False)]
    return jax.tree_util.tree_map(lambda *x: np.concatenate(x), *map(to_host, outs))


def _best(
    model: Transformer,
    params: Params,
    inputs: jax.Array | np.ndarray,
    *,
    spec: decode.DecodeSpec,
    early_stopping: beam_search.EarlyStopping,
    max_decode_len: int,
    beam_size: int,
    alpha: float,
) -> Any:
    """`decode_best`'s decoder call on one device, not awaited: [B, S] -> its output, [B, ...]."""
    if beam_size == 1:
        return translate_greedy(model, params, inputs, spec, max_decode_len=max_decode_len)
    out = translate_beam(
        model,
        params,
        inputs,
        spec,
        max_decode_len=max_decode_len,
        beam_size=beam_size,
        alpha=alpha,
        early_stopping=early_stopping,
    )
    return jax.tree_util.tree_map(lambda x: x[:, 0], out)  # [B, beam, ...] -> [B, ...]
