"""Multi-head attention: self- and encoder–decoder, with the decode cache and its step."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfjax.model.config import TransformerConfig
from tfjax.model.layers import (
    BATCH,
    EMBED,
    FUSE_MIN_ROWS,
    HEADS,
    KV,
    LENGTH,
    Dense,
    constrain,
    fused_dense,
)


class DecodePosition(NamedTuple):
    """Where a decode call of the decoder is, for its self-attention caches.

    Built once per call by the decoder and shared by all its layers, whose caches have the same
    slots: `select` is the one-hot form of the decoder's `origin` table, so it is derived once
    per step rather than once per layer.
    """

    index: jax.Array | None  # int32 [] position of this step's token; None when filling
    # bool [B', G, J, L]: for row b' * beams + g, True at the slot j holding its position l;
    # None when filling.
    select: jax.Array | None
    beams: int  # rows per sentence, B / B'
    # bool [B, 1, 1, L]: the positions each row may read, in rolling caches (see
    # `Decoder._decode_state`), where rows start at different steps; None: positions < index.
    readable: jax.Array | None = None


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; self- or encoder–decoder, with a decode cache.

    A teacher-forced pass applied with mutable=["intermediates"] sows each layer's attention
    probabilities as "weights", float32 [B, H, T, S] (`tfjax.generate.attention_weights`
    stacks them). Decode steps never record: the decoder being causal and deterministic, a
    teacher-forced pass over bos plus a hypothesis's tokens gives, row by row, the weights
    each decode step of that hypothesis used.
    """

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
            layers = [proj(name=n) for n in ("query", "key", "value")]
            q, k, v = fused_dense(x, layers, min_rows=0 if stored else FUSE_MIN_ROWS)
            if stored:
                out = self._decode_step(q, k, v, decode_position)
            else:
                if decode:
                    self._create_cache(k, decode_position.beams)
                out = self._attend(q, k, v, mask, deterministic)
        dense_out = Dense((cfg.d_model,), (HEADS, KV, EMBED), cfg, name="out")
        return constrain(dense_out(out), (BATCH, LENGTH, EMBED))  # [B, T, D]

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
        creates survive. Row b * beams + g writes slot [b, :, :, g]. Beam search reorders only
        cache leaves whose leading axis is B, so these, led by B', are never reordered: a
        hypothesis reads each earlier position from the slot `DecodePosition.select` marks.
        Positions last: XLA:CPU transposed (and copied) a [B, L, H, K] cache at every step.
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
        attention and copy the whole cache so both could write. Reading through `select`
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
        if where.readable is None:
            before = (jnp.arange(length) < where.index)[None, None, None, :]  # [1, 1, 1, L]
        else:
            before = where.readable  # [B, 1, 1, L], beams == 1
        grouped = [x.reshape(sentences, beams, *x.shape[2:]) for x in (q, k, v)]  # [B', G, H, K]
        out = attend_stored(grouped[0], keys, values, before, own=grouped[1:], select=where.select)
        # Written only once read: the write position depends on the attention's output
        # (x != x is false unless NaN, where the step is lost anyway, and XLA cannot fold
        # it); otherwise XLA may order the in-place write first, so it copied every cache
        # twice (test_decode_step_updates_self_attention_caches_in_place counts the copies).
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
        """softmax(q k^T / sqrt(K)) v with `mask`; [B, T, H, K] x [B, S, H, K] -> [B, T, H, K].

        Deterministic passes applied with mutable=["intermediates"] also record the attention
        probabilities (see `_attend_recorded`); passes with attention dropout do not.
        """
        cfg = self.config
        q, k, v = (constrain(a, (BATCH, LENGTH, HEADS, KV)) for a in (q, k, v))
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
        if self.is_mutable_collection("intermediates"):
            return self._attend_recorded(q, k, v, mask)
        # Picks fused kernels where the platform has them (cuDNN flash attention on GPU).
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def _attend_recorded(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
    ) -> jax.Array:
        """`_attend` with its probabilities written out and sown as "intermediates"/"weights".

        Taken only when the caller makes "intermediates" mutable (a trace-time check), so
        training, scoring and decoding compile the fused path as before. The output is
        computed from the sown probabilities, so the two always agree.

        Args:
          q: [B, T, H, K] queries; k, v: [B, S, H, K] keys and values.
          mask: bool, broadcastable to [B, 1, T, S]; True where attention is allowed.
        Returns:
          [B, T, H, K]; sows float32 [B, H, T, S] (from `_grouped`: [B', H, beams * T, S]).
        """
        scale = 1.0 / np.sqrt(q.shape[-1])
        scores = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            # The finite floor gives 0 weight to masked positions (and a uniform row, not NaN,
            # to a row with nothing to attend to, such as a padded sentence of a batch).
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, H, T, S]
        self.sow("intermediates", "weights", probs)
        return jnp.einsum("BHTS,BSHK->BTHK", probs.astype(v.dtype), v)


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
