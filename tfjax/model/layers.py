"""Blocks shared by encoder and decoder: axis names, projections, norms, embeddings, masks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfjax.model.config import ACTIVATIONS, TransformerConfig

# Logical axis names, shared by parameters and activations; a mesh's rules map them to devices.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"
AXES = (BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB)


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
        y = product(x.astype(self.config.dtype), kernel, n_in)
        return y if bias is None else add_bias(y, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def product(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] contracted with kernel [*in, *F] over the n_in `in` axes: [..., *F], in
    x's dtype, with a written-out gradient.

    Below float32 the products accumulate in float32 and round once, forward and backward:
    XLA:CPU runs a bf16 x bf16 -> f32 matmul at about twice its fp32 rate on CPUs with
    AVX512-BF16, and a bf16-output one no faster than fp32 (accelerators accumulate in f32
    either way). In float32 the written-out backward pays too: for autodiff's transpose of the
    tensordot XLA:CPU copied the output's cotangent transposed ([N, F] -> [F, N]) and ran the
    weight-gradient product on Eigen; contracting x's and g's leading axes keeps it one YNNPACK
    product (README "Benchmarks": W-base train step 3-5% faster on AVX2). Being a custom_vjp,
    it has no forward-mode derivative (jax.jvp) in any dtype.
    """
    y = jnp.tensordot(x, kernel, axes=n_in, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _product_fwd(x: jax.Array, kernel: jax.Array, n_in: int):
    return product(x, kernel, n_in), (x, kernel)


def _product_bwd(n_in: int, residuals, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Autodiff's transpose would give bf16-output products; these accumulate in f32 too.
    x, kernel = residuals  # [..., *in], [*in, *F]; g [..., *F]
    batch, features = x.ndim - n_in, kernel.ndim - n_in
    g = g.astype(x.dtype)
    dx = jnp.tensordot(  # [..., *in]: g and kernel contracted over F
        g, kernel, axes=(tuple(range(batch, g.ndim)), tuple(range(n_in, n_in + features))),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    dkernel = jnp.tensordot(  # [*in, *F]: x and g contracted over the leading batch axes
        x, g, axes=(tuple(range(batch)), tuple(range(batch))), preferred_element_type=jnp.float32
    )
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


product.defvjp(_product_fwd, _product_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y [..., *F] + bias [*F], in one dtype, whose gradient for the bias sums the rows in
    float32.

    Autodiff's gradient, a sum of bf16 cotangents over the leading axes, is what XLA:CPU turned
    into float32 reduce-windows over [B, T] taking 5-10 ms per projection of a W-small bf16
    train step (16% of its op time on an AVX-512 + AMX CPU); the rows summed as one axis in
    float32 run as one plain reduction and round once. Float32 goes the same way.
    """
    if y.dtype != bias.dtype:
        raise ValueError(f"add_bias takes one dtype, got {y.dtype} and {bias.dtype}")
    return y + bias


def _add_bias_fwd(y: jax.Array, bias: jax.Array):
    return add_bias(y, bias), bias.shape


def _add_bias_bwd(features: tuple[int, ...], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = g.reshape(-1, *features)  # [..., *F] -> [N, *F]
    return g, jnp.sum(rows, axis=0, dtype=jnp.float32).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# Rows N from which `fused_dense` stacks its kernels (see there).
FUSE_MIN_ROWS = 256


def fused_dense(
    x: jax.Array, layers: Sequence[Dense], *, min_rows: int = FUSE_MIN_ROWS
) -> list[jax.Array]:
    """Several projections of one input [..., D] as one matmul: [..., *features] each.

    Their kernels [D, *F] are stacked to [D, n, *F] for the product: one [N, D] x [D, n F]
    matmul keeps the CPU's (and an accelerator's) matrix units busier than n thin ones. The
    parameters stay per projection. Below `min_rows` rows N the projections run one by one:
    stacking copies the kernels in every call, and for a sentence or two that copy cost about
    as much as the product (encoding one to four sentences on 2 CPU cores was 10-25% faster
    unstacked). A decode step passes 0: inside the decoding loop the stacked kernels are
    loop-invariant, made once per decoder call.
    """
    if math.prod(x.shape[:-1]) < min_rows:
        return [layer(x) for layer in layers]
    kernels, biases = zip(*(layer.weights(x.shape[-1:]) for layer in layers), strict=True)
    y = product(x.astype(layers[0].config.dtype), jnp.stack(kernels, axis=1), 1)
    if biases[0] is not None:
        y = add_bias(y, jnp.stack(biases))  # [..., n, *F] + [n, *F]
    features = (slice(None),) * (kernels[0].ndim - 1)
    return [y[(..., i, *features)] for i in range(len(layers))]


def layer_norm(cfg: TransformerConfig, name: str) -> nn.Module:
    """LayerNorm over D, in the config's dtypes, its scale and bias named (EMBED,)."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        name=name,
    )


def token_embedding(num: int, cfg: TransformerConfig) -> nn.Embed:
    """A table [num, D] of token embeddings, named (VOCAB, EMBED).

    Built by the owner of the table and passed to `Embedder` (and to tied logits), so source
    and target can share one.
    """
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


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding hint; a no-op unless logical axis rules and a mesh are set."""
    return nn.with_logical_constraint(x, names)


class Dropout(nn.Module):
    """Inverted dropout whose mask hashes each element's index with a per-call seed.

    flax's nn.Dropout draws threefry bits for every element (about 50 integer operations a
    32-bit word); here two words are drawn per call from the module's "dropout" rng and each
    element's decision is murmur3's 32-bit finaliser, twice, over its index in the whole
    array: about a dozen operations, the same mask however the array is sharded (the index is
    global), and the drop probability `rate` to within 2^-32.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """x [...] -> x with each element zeroed with probability `rate`, the rest / (1 - rate)."""
        if deterministic or self.rate == 0:
            return x
        if self.rate >= 1:
            return jnp.zeros_like(x)
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        threshold = np.uint32(min(round(self.rate * 2**32), 2**32 - 1))
        keep = hash_bits(seed, x.shape) >= threshold
        return jnp.where(keep, x / (1 - self.rate), jnp.zeros_like(x))


def hash_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 [shape]: a hash of each element's flat (row-major) index, keyed by seed uint32 [2]."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):  # One iota per axis: each shard computes its own.
        index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return _fmix32(_fmix32(index + seed[0]) ^ seed[1])


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection of uint32 whose every input bit flips each output bit
    with probability about 1/2."""
    h ^= h >> 16
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> 13
    h *= np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


class FeedForward(nn.Module):
    """Position-wise feed-forward: Dense(d_ff) -> activation -> dropout -> Dense(d_model)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        cfg = self.config
        h = Dense((cfg.d_ff,), (EMBED, MLP), cfg, name="wi")(x)  # [B, T, F]
        h = constrain(ACTIVATIONS[cfg.activation](h), (BATCH, LENGTH, MLP))
        h = Dropout(cfg.activation_dropout_rate)(h, deterministic=deterministic)
        return Dense((cfg.d_model,), (MLP, EMBED), cfg, name="wo")(h)  # [B, T, D]


def residual(
    cfg: TransformerConfig,
    x: jax.Array,
    sublayer: Callable[[jax.Array], jax.Array],
    norm_name: str,
    deterministic: bool,
) -> jax.Array:
    """[B, T, D] -> [B, T, D]: post-LN LN(x + dropout(f(x))), or pre-LN x + dropout(f(LN(x))).

    Called inside a compact module, so the LayerNorm and Dropout it makes belong to that module.
    """
    norm = layer_norm(cfg, norm_name)
    y = sublayer(norm(x) if cfg.pre_norm else x)
    y = x + Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return constrain(y if cfg.pre_norm else norm(y), (BATCH, LENGTH, EMBED))


class Embedder(nn.Module):
    """Token embedding (optionally scaled by sqrt(d_model)) plus positions, an optional
    LayerNorm (BERT), then dropout."""

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
        if cfg.embedding_norm:
            x = layer_norm(cfg, "norm")(x)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return constrain(x, (BATCH, LENGTH, EMBED))


def default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    """Given per-segment positions [B, T], or 0..T-1 as [1, T]."""
    return jnp.arange(tokens.shape[1])[None] if positions is None else positions


def segment_mask(q_segments: jax.Array | None, k_segments: jax.Array | None) -> jax.Array | None:
    """[B, Tq], [B, Tk] -> bool [B, 1, Tq, Tk]: queries only see keys of their own segment."""
    if q_segments is None:
        return None
    return (q_segments[:, :, None] == k_segments[:, None, :])[:, None]


def all_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Elementwise AND of the masks given (broadcasting); None when none is given."""
    present = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None
