"""The Transformer's Linen modules: config, embeddings, attention with a decode cache, layers.

Dimension letters used in shapes and einsums throughout:
  B batch (rows; in beam search B = sentences * beams), S source length, T target length,
  L max decode length, D d_model, H heads, K head_dim, F d_ff, V vocabulary.

Decode mode (`decode=True`) keeps, per decoder layer, a self-attention cache of keys and values
`[sentences, H, K, beams, L]` and the encoder–decoder keys and values `[sentences, H, K, S]`,
projected once per source sentence: positions last, the layout XLA's attention dots read, so
no decode step transposes a cache. Neither is reordered by beam search (their leading axis is
sentences); the decoder keeps an `origin [B, L]` table instead, reordered with the beams, that
names the beam slot holding each position of each hypothesis (`DecodePosition`). Queries of
several beams of one sentence are folded into the query axis when they meet the keys, so
beams never copy them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Logical axis names, shared by parameters and activations; a mesh's rules map them to devices.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "swish": nn.swish,
}
POSITIONS = ("sinusoidal", "sinusoidal_half", "learned")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every size and switch of the model; frozen so it can be a static jit argument."""

    vocab_size: int = 32000  # source vocabulary (the joint one when embeddings are shared)
    target_vocab_size: int | None = None  # None: the same size as vocab_size
    share_embeddings: bool = True  # one table for source and target tokens
    tie_output: bool = True  # logits use the target embedding table, transposed
    output_bias: bool = False  # a learned bias added to the logits (Marian has one)
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model), as the paper
    pad_id: int = 0  # source padding id; masked out of every attention over the source
    d_model: int = 512  # width of every residual stream
    num_heads: int = 8  # attention heads
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 2048  # inner width of the position-wise feed-forward
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int | None = None  # None: num_layers
    activation: str = "relu"  # feed-forward nonlinearity, a key of ACTIVATIONS
    pre_norm: bool = False  # False: post-LN (the paper); True: pre-LN plus a final LayerNorm
    layer_norm_epsilon: float = 1e-6  # LayerNorm's variance floor (torch's default is 1e-5)
    use_bias: bool = True  # biases in attention projections and the feed-forward
    positions: str = "sinusoidal"  # "sinusoidal" (interleaved), "sinusoidal_half", "learned"
    max_len: int = 512  # longest source or target a position table covers
    dropout_rate: float = 0.1  # on embeddings and on every sublayer output
    attention_dropout_rate: float = 0.0  # on attention probabilities
    activation_dropout_rate: float = 0.0  # inside the feed-forward, after the activation
    dtype: Any = jnp.float32  # compute dtype (e.g. jnp.bfloat16)
    param_dtype: Any = jnp.float32  # storage dtype of the parameters

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}; expected one of {POSITIONS}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.share_embeddings and self.target_vocab_size not in (None, self.vocab_size):
            raise ValueError("share_embeddings needs target_vocab_size == vocab_size (or None)")

    @property
    def target_vocab(self) -> int:
        return self.target_vocab_size or self.vocab_size

    @property
    def kv_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Table 3 rows.
    "base": dict(d_model=512, d_ff=2048, num_heads=8, num_layers=6, dropout_rate=0.1),
    "big": dict(d_model=1024, d_ff=4096, num_heads=16, num_layers=6, dropout_rate=0.3),
    # Small enough that a test compiles and runs in about a second.
    "tiny": dict(
        vocab_size=64, d_model=32, d_ff=64, num_heads=4, num_layers=2, max_len=64, dropout_rate=0.0
    ),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """A `TransformerConfig` from one of PRESETS ("base", "big", "tiny") plus overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})


def sinusoids(length: int, dim: int, half: bool = False) -> np.ndarray:
    """Sinusoidal position table [length, dim].

    The paper's form interleaves: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same).
    `half=True` puts all the sines first and all the cosines after, as Marian does.
    """
    pos = np.arange(length, dtype=np.float64)[:, None]  # [length, 1]
    inv_freq = 1.0 / 10000 ** (2 * np.arange((dim + 1) // 2) / dim)  # [ceil(dim / 2)]
    angles = pos * inv_freq  # [length, ceil(dim / 2)]
    sin, cos = np.sin(angles), np.cos(angles)[:, : dim // 2]
    if half:
        return np.concatenate([sin, cos], axis=1).astype(np.float32)
    table = np.zeros((length, dim))
    table[:, 0::2], table[:, 1::2] = sin, cos
    return table.astype(np.float32)


class Dense(nn.Module):
    """x [..., *in] @ kernel [*in, *features] (+ bias [*features]), with logical axis names.

    Written out rather than nn.DenseGeneral, which initialises a flattened kernel and so cannot
    carry one logical name per axis of a [D, H, K] projection once a mesh is active.
    """

    features: tuple[int, ...]  # output dims, e.g. (H, K) or (D,)
    names: tuple[str, ...]  # logical names of the kernel's axes, input axes first
    config: TransformerConfig

    @nn.compact
    def weights(self, in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """(kernel [*in, *features], bias [*features] or None) in the compute dtype."""
        cfg = self.config
        n_in = len(in_shape)
        shape = (*in_shape, *self.features)
        # Xavier-uniform over the whole input and output blocks of a multi-axis kernel.
        init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform",
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))),
        )  # fmt: skip
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.names), shape, cfg.param_dtype
        )
        bias = None
        if cfg.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.names[n_in:])
            bias = self.param("bias", init, self.features, cfg.param_dtype).astype(cfg.dtype)
        return kernel.astype(cfg.dtype), bias

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in] -> [..., *features]; `in` is the trailing len(names) - len(features) dims."""
        n_in = len(self.names) - len(self.features)
        kernel, bias = self.weights(x.shape[-n_in:])
        y = jnp.tensordot(x.astype(self.config.dtype), kernel, axes=n_in)
        return y if bias is None else y + bias


def fused_dense(x: jax.Array, layers: Sequence[Dense]) -> list[jax.Array]:
    """Several projections of one input [..., D] as one matmul: [..., *features] each.

    Their kernels [D, *F] are stacked to [D, n, *F] for the product: one [N, D] x [D, n F]
    matmul keeps the CPU's (and an accelerator's) matrix units busier than n thin ones. The
    parameters stay per projection.
    """
    kernels, biases = zip(*(layer.weights(x.shape[-1:]) for layer in layers), strict=True)
    y = jnp.tensordot(x.astype(layers[0].config.dtype), jnp.stack(kernels, axis=1), axes=1)
    if biases[0] is not None:
        y = y + jnp.stack(biases)  # [..., n, *F] + [n, *F]
    features = (slice(None),) * (kernels[0].ndim - 1)
    return [y[(..., i, *features)] for i in range(len(layers))]


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.Module:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        name=name,
    )


def _embed(num: int, cfg: TransformerConfig) -> nn.Embed:
    # stddev d_model^-0.5: after sqrt(d_model) scaling the inputs have unit variance, and tied
    # logits start near unit variance too.
    init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
    return nn.Embed(
        num,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(init, (VOCAB, EMBED)),
    )


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding hint; a no-op unless logical axis rules and a mesh are set."""
    return nn.with_logical_constraint(x, names)


class DecodePosition(NamedTuple):
    """Where a decode call of the decoder is, for its self-attention caches."""

    index: jax.Array | None  # int32 [] position of this step's token; None when filling
    origin: jax.Array  # int32 [B, L]: the row whose cache slot holds each position of each row
    beams: int  # rows per sentence, B / B'


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; self- or encoder–decoder, with a decode cache."""

    config: TransformerConfig
    cross: bool = False  # encoder–decoder attention: keys and values come from the encoder

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None,
        mask: jax.Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
        decode_position: DecodePosition | None = None,
    ) -> jax.Array:
        """Attend from queries `x` [B, T, D] to `memory` [B', S, D] (self: memory is x).

        Args:
          x: [B, T, D] query inputs.
          memory: [B', S, D] encoder outputs for cross-attention, where B = B' * beams; None
            for self-attention, or for cross-attention once the decode cache holds its keys.
          mask: bool, broadcastable to [B', 1, T * beams, S] (cross) or [B, 1, T, S] (self);
            True where attention is allowed. Decode steps build their own self-attention mask.
          deterministic: disables dropout.
          decode: use and update the "cache" collection.
          decode_position: where a decode call is (self-attention in decode mode).
        Returns:
          [B, T, D].
        """
        cfg = self.config
        proj = functools.partial(Dense, (cfg.num_heads, cfg.kv_dim), (EMBED, HEADS, KV), cfg)
        stored = decode and self.has_variable("cache", "cached_key")
        if self.cross:
            q = proj(name="query")(x)  # [B, T, H, K]
            if stored:  # [B', H, K, S] each
                keys, values = (
                    self.get_variable("cache", n) for n in ("cached_key", "cached_value")
                )
                out = _grouped(attend_stored, q, keys, values, mask)
            else:
                k, v = self._cross_keys_values(memory, decode)  # [B', S, H, K] each
                out = _grouped(self._attend, q, k, v, mask, deterministic)
        else:
            q, k, v = fused_dense(x, [proj(name=n) for n in ("query", "key", "value")])
            if stored:
                out = self._decode_step(q, k, v, decode_position)
            else:
                if decode:
                    self._create_cache(k, decode_position.beams)
                out = self._attend(q, k, v, mask, deterministic)
        dense_out = Dense((cfg.d_model,), (HEADS, KV, EMBED), cfg, name="out")
        return _constrain(dense_out(out), (BATCH, LENGTH, EMBED))  # [B, T, D]

    def _cross_keys_values(self, memory: jax.Array | None, decode: bool) -> tuple[jax.Array, ...]:
        """Keys and values [B', S, H, K] of the encoder output; stored [B', H, K, S] to decode."""
        cfg = self.config
        proj = functools.partial(Dense, (cfg.num_heads, cfg.kv_dim), (EMBED, HEADS, KV), cfg)
        if memory is None:
            raise ValueError("cross-attention needs the encoder output before its cache is filled")
        k, v = fused_dense(memory, [proj(name="key"), proj(name="value")])
        if decode:
            self.put_variable("cache", "cached_key", k.transpose(0, 2, 3, 1))
            self.put_variable("cache", "cached_value", v.transpose(0, 2, 3, 1))
        return k, v

    def _create_cache(self, k: jax.Array, beams: int) -> None:
        """Zero self-attention caches [B', H, K, beams, L] for keys like `k` [B, L, H, K].

        The cache-filling call sees the full-length dummy target; under jit only the caches it
        creates survive. Row b * beams + g writes slot [b, :, :, g] and the caches are never
        reordered by beam (their leading axis is B', see `tfjax.decode`): a hypothesis reads
        each earlier position from the slot its `DecodePosition.origin` names. Positions-last:
        XLA:CPU transposed (and copied) a [B, L, H, K] cache at every step.
        """
        rows, length, h, d = k.shape
        shape = (rows // beams, h, d, beams, length)
        for name in ("cached_key", "cached_value"):
            self.variable("cache", name, jnp.zeros, shape, k.dtype)

    def _decode_step(
        self, q: jax.Array, k: jax.Array, v: jax.Array, where: DecodePosition
    ) -> jax.Array:
        """One token per row [B, 1, H, K] -> [B, 1, H, K]: attends to the cache and itself.

        The step reads the cache as it was (positions < index, each from the slot of the row
        that wrote it for this hypothesis) and attends to its own key and value beside it,
        then writes them at `index`. Read before written, the cache is updated in place:
        attending to the updated cache made XLA fuse a second copy of the update into the
        attention and copy the whole cache so both could write. Reading through `origin`
        instead of reordering the caches by beam after each step saves a gather and a write
        of every cache per step; the attention products grow by a factor of beams, which is
        small beside the projections.
        """
        if q.shape[1] != 1:
            raise ValueError(f"decode steps take one token per row, got length {q.shape[1]}")
        cached_key, cached_value = (
            self.variable("cache", n) for n in ("cached_key", "cached_value")
        )
        keys, values = cached_key.value, cached_value.value  # [B', H, K, G, L]
        sentences, beams, length = keys.shape[0], keys.shape[3], keys.shape[4]
        # [B, L] rows -> [B', G, L] slot within the sentence -> [B', G, J, L], one-hot over J.
        slot = (where.origin % beams).reshape(sentences, beams, length)
        select = slot[:, :, None, :] == jnp.arange(beams)[None, None, :, None]
        before = (jnp.arange(length) < where.index)[None, None, None, :]  # [1, 1, 1, L]
        grouped = [x.reshape(sentences, beams, *x.shape[2:]) for x in (q, k, v)]  # [B', G, H, K]
        out = attend_stored(grouped[0], keys, values, before, own=grouped[1:], select=select)
        # Written only once read: the write position depends on the attention's output
        # (x != x is false unless NaN, where the step is lost anyway, and XLA cannot fold
        # it); otherwise XLA may order the in-place write first, so it copied every cache.
        after = jnp.any(out != out).astype(jnp.int32)
        start = (0, 0, 0, 0, where.index + after)
        # [B', G, H, K] -> [B', H, K, G, 1]
        k, v = (x.transpose(0, 2, 3, 1)[..., None] for x in grouped[1:])
        cached_key.value = jax.lax.dynamic_update_slice(keys, k, start)
        cached_value.value = jax.lax.dynamic_update_slice(values, v, start)
        return out.reshape(q.shape)

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, deterministic: bool
    ) -> jax.Array:
        """softmax(q k^T / sqrt(K)) v with `mask`; [B, T, H, K] x [B, S, H, K] -> [B, T, H, K]."""
        cfg = self.config
        q, k, v = (_constrain(a, (BATCH, LENGTH, HEADS, KV)) for a in (q, k, v))
        if cfg.attention_dropout_rate > 0 and not deterministic:
            # jax.nn.dot_product_attention has no dropout; flax's reference implementation does.
            return nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                dropout_rng=self.make_rng("dropout"),
                dropout_rate=cfg.attention_dropout_rate,
                deterministic=False,
                dtype=cfg.dtype,
            )
        # Picks fused kernels where the platform has them (cuDNN flash attention on GPU).
        return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _grouped(attend: Callable[..., jax.Array], q: jax.Array, k: jax.Array, *args) -> jax.Array:
    """Cross-attention of B = B' * beams query rows to B' sentences' keys k [B', ...].

    q [B, T, H, K] -> [B', beams * T, H, K] for `attend(q, k, *args)`, and its output back.
    """
    rows, length = q.shape[:2]
    groups = rows // k.shape[0]  # beams per sentence; 1 outside beam search
    out = attend(q.reshape(k.shape[0], groups * length, *q.shape[2:]), k, *args)
    return out.reshape(rows, length, *out.shape[2:])  # [B' * beams, T, H, K] = [B, T, H, K]


def attend_stored(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    own: Sequence[jax.Array] | None = None,
    select: jax.Array | None = None,
) -> jax.Array:
    """Decode-step attention to keys and values as a cache stores them, positions last.

    Contracted in that layout: going through [B, S, H, K], XLA transposed and copied every
    cache at every step.

    Args:
      q: [B, G, H, K] queries (G: one per beam, or the one new token).
      keys, values: [B, H, K, S], or [B, H, K, J, S] with `select`.
      mask: bool, broadcastable to [B, H, G, S]; True where attention is allowed.
      own: each query's own key and value [B, G, H, K], attended beside the stored ones.
      select: bool [B, G, J, S], one True per (query, position): the slot j that query reads
        position s from.
    Returns:
      [B, G, H, K].
    """
    if select is None:
        keys, values = keys[:, :, :, None], values[:, :, :, None]  # [B, H, K, 1, S]
        select = jnp.ones((1, 1, 1, 1), jnp.bool_)
    scale = 1.0 / np.sqrt(q.shape[-1])
    every = jnp.einsum("BGHK,BHKJS->BHGJS", q, keys)  # [B, H, G, J, S]
    scores = jnp.sum(jnp.where(select[:, None], every, 0), axis=3) * scale  # [B, H, G, S]
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    if own is not None:
        own_score = jnp.einsum("BGHK,BGHK->BHG", q, own[0]) * scale  # [B, H, G]
        scores = jnp.concatenate([scores, own_score[..., None]], axis=-1)  # [B, H, G, S + 1]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    spread = jnp.where(
        select[:, None], probs[:, :, :, None, : keys.shape[-1]], 0
    )  # [B, H, G, J, S]
    out = jnp.einsum("BHGJS,BHKJS->BGHK", spread, values)
    if own is not None:
        out += probs[..., -1].transpose(0, 2, 1)[..., None] * own[1]  # [B, G, H, 1] x [B, G, H, K]
    return out


class FeedForward(nn.Module):
    """Position-wise feed-forward: Dense(d_ff) -> activation -> dropout -> Dense(d_model)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        cfg = self.config
        h = Dense((cfg.d_ff,), (EMBED, MLP), cfg, name="wi")(x)  # [B, T, F]
        h = _constrain(ACTIVATIONS[cfg.activation](h), (BATCH, LENGTH, MLP))
        h = nn.Dropout(cfg.activation_dropout_rate)(h, deterministic=deterministic)
        return Dense((cfg.d_model,), (MLP, EMBED), cfg, name="wo")(h)  # [B, T, D]


def _residual(
    cfg: TransformerConfig,
    x: jax.Array,
    sublayer: Callable[[jax.Array], jax.Array],
    norm_name: str,
    deterministic: bool,
) -> jax.Array:
    """[B, T, D] -> [B, T, D]: post-LN LN(x + dropout(f(x))), or pre-LN x + dropout(f(LN(x))).

    Called inside a compact module, so the LayerNorm and Dropout it makes belong to that module.
    """
    norm = _layer_norm(cfg, norm_name)
    y = sublayer(norm(x) if cfg.pre_norm else x)
    y = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return _constrain(y if cfg.pre_norm else norm(y), (BATCH, LENGTH, EMBED))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside `_residual`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """x [B, S, D], mask [B, 1, S, S] -> [B, S, D]."""
        cfg = self.config
        residual = functools.partial(_residual, cfg, deterministic=deterministic)
        attention = Attention(cfg, name="self_attention")
        x = residual(x, lambda h: attention(h, None, mask, deterministic=deterministic),
                     "self_attention_norm")  # fmt: skip
        mlp = FeedForward(cfg, name="mlp")
        return residual(x, lambda h: mlp(h, deterministic=deterministic), "mlp_norm")


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder–decoder attention, feed-forward; each inside `_residual`."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        y: jax.Array,
        memory: jax.Array | None,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
        decode_position: DecodePosition | None = None,
    ) -> jax.Array:
        """y [B, T, D], memory [B', S, D] -> [B, T, D]; masks as in `Attention`."""
        cfg = self.config
        residual = functools.partial(_residual, cfg, deterministic=deterministic)
        kw = dict(deterministic=deterministic, decode=decode)
        self_attention = Attention(cfg, name="self_attention")
        y = residual(
            y,
            lambda h: self_attention(h, None, self_mask, decode_position=decode_position, **kw),
            "self_attention_norm",
        )
        cross_attention = Attention(cfg, cross=True, name="cross_attention")
        y = residual(
            y, lambda h: cross_attention(h, memory, cross_mask, **kw), "cross_attention_norm"
        )
        mlp = FeedForward(cfg, name="mlp")
        return residual(y, lambda h: mlp(h, deterministic=deterministic), "mlp_norm")


class Embedder(nn.Module):
    """Token embedding (optionally scaled by sqrt(d_model)) plus positions, then dropout."""

    config: TransformerConfig
    embed: nn.Embed

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, *, deterministic: bool
    ) -> jax.Array:
        """tokens [B, T] int, positions [B or 1, T] int -> [B, T, D]."""
        cfg = self.config
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={cfg.max_len}")
        x = self.embed(tokens)  # [B, T, D]
        if cfg.scale_embeddings:
            x = x * jnp.sqrt(cfg.d_model).astype(cfg.dtype)
        if cfg.positions == "learned":
            table = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (LENGTH, EMBED)),
                (cfg.max_len, cfg.d_model),
                cfg.param_dtype,
            )
        else:
            table = sinusoids(cfg.max_len, cfg.d_model, half=cfg.positions == "sinusoidal_half")
        x = x + jnp.asarray(table, cfg.dtype)[positions]  # [B, T, D]
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return _constrain(x, (BATCH, LENGTH, EMBED))


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    """Given per-segment positions [B, T], or 0..T-1 as [1, T]."""
    return jnp.arange(tokens.shape[1])[None] if positions is None else positions


def _segment_mask(q_segments: jax.Array | None, k_segments: jax.Array | None) -> jax.Array | None:
    """[B, Tq], [B, Tk] -> bool [B, 1, Tq, Tk]: queries only see keys of their own segment."""
    if q_segments is None:
        return None
    return (q_segments[:, :, None] == k_segments[:, None, :])[:, None]


def _and(*masks: jax.Array | None) -> jax.Array | None:
    present = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


class Encoder(nn.Module):
    """Embedding plus num_layers EncoderLayers (plus a final LayerNorm when pre-LN)."""

    config: TransformerConfig
    embed: nn.Embed

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool,
    ) -> jax.Array:
        """inputs [B, S] int -> [B, S, D]; packed rows pass segment_ids and positions [B, S]."""
        cfg = self.config
        x = Embedder(cfg, self.embed, name="embedder")(
            inputs, _positions(inputs, positions), deterministic=deterministic
        )
        keep = (inputs != cfg.pad_id)[:, None, None, :]  # [B, 1, 1, S]
        mask = _and(keep, _segment_mask(segment_ids, segment_ids))  # [B, 1, S, S]
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic=deterministic)
        return _layer_norm(cfg, "final_norm")(x) if cfg.pre_norm else x


class Decoder(nn.Module):
    """Embedding, decoder layers (plus a final LayerNorm when pre-LN), and the output logits."""

    config: TransformerConfig
    embed: nn.Embed

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array | None,
        inputs: jax.Array | None,
        decoder_inputs: jax.Array,
        *,
        inputs_segment_ids: jax.Array | None = None,
        targets_segment_ids: jax.Array | None = None,
        targets_positions: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) of the next token at every target position.

        Args:
          encoded: [B', S, D] encoder output (B = B' * beams); None on decode steps.
          inputs: [B', S] source ids, for the source padding mask; None on decode steps.
          decoder_inputs: [B, T] target ids shifted right (bos first); [B, 1] on decode steps.
          inputs_segment_ids, targets_segment_ids, targets_positions: [B, S], [B, T], [B, T]
            for packed rows.
          deterministic: disables dropout.
          decode: cache mode; see the module docstring and `Transformer.init_cache`.
        """
        cfg = self.config
        positions = _positions(decoder_inputs, targets_positions)
        self_mask = nn.make_causal_mask(decoder_inputs, dtype=jnp.bool_)  # [B, 1, T, T]
        self_mask = _and(self_mask, _segment_mask(targets_segment_ids, targets_segment_ids))
        where = None
        if decode:
            positions, where, cross_mask = self._decode_state(inputs, decoder_inputs, positions)
        else:
            cross_mask = (inputs != cfg.pad_id)[:, None, None, :]  # [B', 1, 1, S]
            cross_mask = _and(cross_mask, _segment_mask(targets_segment_ids, inputs_segment_ids))
        y = Embedder(cfg, self.embed, name="embedder")(
            decoder_inputs, positions, deterministic=deterministic
        )
        for i in range(cfg.decoder_layers):
            y = DecoderLayer(cfg, name=f"layer_{i}")(
                y, encoded, self_mask, cross_mask,
                deterministic=deterministic, decode=decode, decode_position=where,
            )  # fmt: skip
        if cfg.pre_norm:
            y = _layer_norm(cfg, "final_norm")(y)
        return self._logits(y)

    def _decode_state(
        self, inputs: jax.Array | None, decoder_inputs: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, DecodePosition, jax.Array]:
        """Decode mode's positions, `DecodePosition` and cross mask, kept in the "cache".

        The cache-filling call (decoder_inputs [B, L]) stores the source padding mask
        [B', 1, 1, S], the index 0 and the origin of every position, its own row; each step
        reads them, claims position index for each row's own cache, and advances the index.
        """
        rows, length = decoder_inputs.shape
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        own_rows = jnp.arange(rows, dtype=jnp.int32)
        origin = self.variable(
            "cache", "origin", lambda: jnp.broadcast_to(own_rows[:, None], (rows, length))
        )
        if not initialized:
            keep = (inputs != self.config.pad_id)[:, None, None, :]
            self.variable("cache", "source_mask", lambda: keep)
            return positions, DecodePosition(None, origin.value, rows // inputs.shape[0]), keep
        step = index.value
        index.value = step + 1
        origin.value = origin.value.at[:, step].set(own_rows)
        keep = self.get_variable("cache", "source_mask")
        where = DecodePosition(step, origin.value, rows // keep.shape[0])
        return jnp.full((1, 1), step), where, keep

    def _logits(self, y: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 [B, T, V], accumulated in float32 whatever the compute dtype."""
        cfg = self.config
        if cfg.tie_output:
            logits = tied_logits(y, self.embed.embedding.astype(cfg.dtype))
        else:
            init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (EMBED, VOCAB))
            kernel = self.param(
                "logits_kernel", init, (cfg.d_model, cfg.target_vocab), cfg.param_dtype
            )
            logits = jnp.einsum(
                "BTD,DV->BTV", y, kernel.astype(cfg.dtype), preferred_element_type=jnp.float32
            )
        if cfg.output_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,))
            logits = logits + self.param("logits_bias", init, (cfg.target_vocab,), cfg.param_dtype)
        return _constrain(logits, (BATCH, LENGTH, VOCAB))


@jax.custom_vjp
def tied_logits(y: jax.Array, table: jax.Array) -> jax.Array:
    """[B, T, D] x embedding table [V, D] -> float32 logits [B, T, V].

    The table is contracted on D as it lies: its transpose would be copied, 4 V D bytes, in
    every decode step. The custom gradient takes the table's as (y^T g)^T, a [D, V] product
    transposed: autodiff's g^T y made XLA:CPU transpose the [B T, V] cotangent, the train
    step's largest array, in a strided copy into which it also fused the softmax gradient.
    """
    return jnp.einsum("BTD,VD->BTV", y, table, preferred_element_type=jnp.float32)


def _tied_logits_fwd(y: jax.Array, table: jax.Array):
    return tied_logits(y, table), (y, table)


def _tied_logits_bwd(residuals, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Results in the operands' dtype, as autodiff's own transpose of the einsum gives them.
    y, table = residuals
    g = g.astype(y.dtype)  # [B, T, V]
    dy = jnp.einsum("BTV,VD->BTD", g, table, preferred_element_type=y.dtype)
    dtable = jnp.einsum("BTD,BTV->DV", y, g, preferred_element_type=table.dtype).T  # [V, D]
    return dy, dtable


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class Transformer(nn.Module):
    """The encoder–decoder Transformer of "Attention Is All You Need"."""

    config: TransformerConfig

    def setup(self) -> None:
        cfg = self.config
        # Names come from the attributes: setup() takes no name= arguments.
        if cfg.share_embeddings:
            self.shared_embedding = _embed(cfg.vocab_size, cfg)
            source = target = self.shared_embedding
        else:
            self.source_embedding = _embed(cfg.vocab_size, cfg)
            self.target_embedding = _embed(cfg.target_vocab, cfg)
            source, target = self.source_embedding, self.target_embedding
        self.encoder = Encoder(cfg, source)
        self.decoder = Decoder(cfg, target)

    def encode(
        self,
        inputs: jax.Array,
        inputs_segment_ids: jax.Array | None = None,
        inputs_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Source ids [B, S] -> encoder output [B, S, D]."""
        return self.encoder(
            inputs, inputs_segment_ids, inputs_positions, deterministic=deterministic
        )

    def decode(
        self,
        encoded: jax.Array | None,
        inputs: jax.Array | None,
        decoder_inputs: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        **segments: jax.Array | None,
    ) -> jax.Array:
        """Logits [B, T, V]; see `Decoder.__call__` for the arguments."""
        return self.decoder(
            encoded, inputs, decoder_inputs, deterministic=deterministic, decode=decode, **segments
        )

    def __call__(
        self,
        inputs: jax.Array,
        decoder_inputs: jax.Array,
        inputs_segment_ids: jax.Array | None = None,
        inputs_positions: jax.Array | None = None,
        targets_segment_ids: jax.Array | None = None,
        targets_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced float32 logits [B, T, V] from source [B, S] and decoder inputs [B, T]."""
        encoded = self.encode(
            inputs, inputs_segment_ids, inputs_positions, deterministic=deterministic
        )
        return self.decode(
            encoded,
            inputs,
            decoder_inputs,
            deterministic=deterministic,
            inputs_segment_ids=inputs_segment_ids,
            targets_segment_ids=targets_segment_ids,
            targets_positions=targets_positions,
        )

    def init_cache(
        self, encoded: jax.Array, inputs: jax.Array, num_rows: int, max_len: int
    ) -> None:
        """Fill the "cache" collection for decoding up to `max_len` tokens in `num_rows` rows.

        encoded [B', S, D] and inputs [B', S] are per sentence; num_rows = B' * beams. Apply
        with `mutable=["cache"]` and keep only the cache: the logits of the dummy target are
        dead code that jit removes.
        """
        dummy = jnp.zeros((num_rows, max_len), jnp.int32)  # [B, L]
        self.decode(encoded, inputs, dummy, decode=True)

    def decode_step(self, ids: jax.Array) -> jax.Array:
        """One cached decoding step: previous tokens [B, 1] -> next-token logits [B, V]."""
        return self.decode(None, None, ids, decode=True)[:, 0]  # [B, 1, V] -> [B, V]
