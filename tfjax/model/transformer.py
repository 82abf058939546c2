"""Encoder and decoder stacks, tied output logits, and the encoder–decoder `Transformer`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfjax.model.attention import Attention, DecodePosition
from tfjax.model.config import TransformerConfig
from tfjax.model.layers import (
    BATCH,
    EMBED,
    LENGTH,
    VOCAB,
    Embedder,
    FeedForward,
    all_masks,
    constrain,
    default_positions,
    layer_norm,
    residual,
    segment_mask,
    token_embedding,
)

# The decoder's name for decoding's [D, V] copy of the tied output table (`with_logits_table`).
LOGITS_TABLE = "logits_table"
# Products of at most this many rows read that copy: above it the [V, D] table was faster.
LOGITS_TABLE_ROWS = 32


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside `residual`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """x [B, S, D], mask [B, 1, S, S] -> [B, S, D]."""
        cfg = self.config
        wrap = functools.partial(residual, cfg, deterministic=deterministic)
        attention = Attention(cfg, name="self_attention")
        x = wrap(x, lambda h: attention(h, None, mask, deterministic=deterministic),
                 "self_attention_norm")  # fmt: skip
        mlp = FeedForward(cfg, name="mlp")
        return wrap(x, lambda h: mlp(h, deterministic=deterministic), "mlp_norm")


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder–decoder attention, feed-forward; each inside `residual`."""

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
        wrap = functools.partial(residual, cfg, deterministic=deterministic)
        kw = dict(deterministic=deterministic, decode=decode)
        self_attention = Attention(cfg, name="self_attention")
        y = wrap(
            y,
            lambda h: self_attention(h, None, self_mask, decode_position=decode_position, **kw),
            "self_attention_norm",
        )
        cross_attention = Attention(cfg, cross=True, name="cross_attention")
        y = wrap(y, lambda h: cross_attention(h, memory, cross_mask, **kw), "cross_attention_norm")
        mlp = FeedForward(cfg, name="mlp")
        return wrap(y, lambda h: mlp(h, deterministic=deterministic), "mlp_norm")


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
            inputs, default_positions(inputs, positions), deterministic=deterministic
        )
        keep = (inputs != cfg.pad_id)[:, None, None, :]  # [B, 1, 1, S]
        mask = all_masks(keep, segment_mask(segment_ids, segment_ids))  # [B, 1, S, S]
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic=deterministic)
        return layer_norm(cfg, "final_norm")(x) if cfg.pre_norm else x


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
        rolling: bool = False,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) of the next token at every target position.

        Args:
          encoded: [B', S, D] encoder output (B = B' * beams); None on decode steps.
          inputs: [B', S] source ids, for the source padding mask; None on decode steps.
          decoder_inputs: [B, T] target ids shifted right (bos first); [B, 1] on decode steps.
          inputs_segment_ids, targets_segment_ids, targets_positions: [B, S], [B, T], [B, T]
            for packed rows.
          deterministic: disables dropout.
          decode: cache mode; see the `tfjax.model` docstring and `Transformer.init_cache`.
          rolling: on the cache-filling call, make the cache rolling (`_decode_state`).
        """
        cfg = self.config
        positions = default_positions(decoder_inputs, targets_positions)
        self_mask = nn.make_causal_mask(decoder_inputs, dtype=jnp.bool_)  # [B, 1, T, T]
        self_mask = all_masks(self_mask, segment_mask(targets_segment_ids, targets_segment_ids))
        where = None
        if decode:
            positions, where, cross_mask = self._decode_state(
                inputs, decoder_inputs, positions, rolling
            )
        else:
            keep = (inputs != cfg.pad_id)[:, None, None, :]  # [B', 1, 1, S]
            cross_mask = all_masks(keep, segment_mask(targets_segment_ids, inputs_segment_ids))
        y = Embedder(cfg, self.embed, name="embedder")(
            decoder_inputs, positions, deterministic=deterministic
        )
        for i in range(cfg.decoder_layers):
            y = DecoderLayer(cfg, name=f"layer_{i}")(
                y, encoded, self_mask, cross_mask,
                deterministic=deterministic, decode=decode, decode_position=where,
            )  # fmt: skip
        if cfg.pre_norm:
            y = layer_norm(cfg, "final_norm")(y)
        return self._logits(y)

    def _decode_state(
        self,
        inputs: jax.Array | None,
        decoder_inputs: jax.Array,
        positions: jax.Array,
        rolling: bool,
    ) -> tuple[jax.Array, DecodePosition, jax.Array]:
        """Decode mode's positions, `DecodePosition` and cross mask, kept in the "cache".

        The cache-filling call (decoder_inputs [B, L]) stores the source padding mask
        [B', 1, 1, S], the index 0 and the origin of every position, its own row; each step
        reads them, claims position index for each row's own cache, and advances the index.
        The step's one-hot `select` is derived from `origin` here, once for all layers.

        A rolling cache (beams 1) also keeps `age` [B], the tokens each row has decoded, so
        that rows may start at different steps: continuous batching puts a new sentence's
        freshly filled rows (age 0) in place of ended ones between steps
        (`tfjax.continuous`). The index then runs round the L slots as a ring, every row
        writing slot index at each step; a row's position is its age, and it reads the age
        slots written last, which are its own as long as it is at most L tokens long.
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
            if rolling:
                if rows != inputs.shape[0]:
                    raise ValueError("a rolling cache has one row per sentence (no beams)")
                self.variable("cache", "age", lambda: jnp.zeros((rows,), jnp.int32))
            return positions, DecodePosition(None, None, rows // inputs.shape[0]), keep
        step = index.value
        keep = self.get_variable("cache", "source_mask")
        sentences, length = keep.shape[0], origin.value.shape[1]
        if self.has_variable("cache", "age"):
            return (*self._rolling_position(step, length), keep)
        index.value = step + 1
        origin.value = origin.value.at[:, step].set(own_rows)
        beams = rows // sentences
        # [B, L] rows -> [B', G, L] slot within the sentence -> [B', G, J, L], one-hot over J.
        slot = (origin.value % beams).reshape(sentences, beams, length)
        select = slot[:, :, None, :] == jnp.arange(beams)[None, None, :, None]
        return jnp.full((1, 1), step), DecodePosition(step, select, beams), keep

    def _rolling_position(self, step: jax.Array, length: int) -> tuple[jax.Array, DecodePosition]:
        """A rolling cache's step: positions [B, 1] (each row's age) and its `DecodePosition`,
        writing slot `step` of the ring; advances the ring index and the ages. With one beam
        every row reads its own slot, so `origin` is neither updated nor read."""
        self.put_variable("cache", "index", (step + 1) % length)
        age = self.variable("cache", "age")
        # Slot j was written (step - 1 - j) mod L steps ago: readable if the row is older.
        written_ago = (step - 1 - jnp.arange(length)) % length  # [L]
        readable = written_ago[None, :] < age.value[:, None]  # [B, L]
        position = age.value[:, None]  # [B, 1]
        # Capped so that a row left idle after its end keeps valid (if unused) positions.
        age.value = jnp.minimum(age.value + 1, length - 1)
        one_slot = jnp.ones((1, 1, 1, 1), jnp.bool_)  # select: [B', G, J, L] with G = J = 1
        return position, DecodePosition(step, one_slot, 1, readable[:, None, None, :])

    def _logits(self, y: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 [B, T, V], accumulated in float32 whatever the compute dtype."""
        cfg = self.config
        few_rows = y.shape[0] * y.shape[1] <= LOGITS_TABLE_ROWS
        if cfg.tie_output and few_rows and self.has_variable("params", LOGITS_TABLE):
            table = self.get_variable("params", LOGITS_TABLE).astype(cfg.dtype)  # [D, V]
            logits = jnp.einsum("BTD,DV->BTV", y, table, preferred_element_type=jnp.float32)
        elif cfg.tie_output:
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
        return constrain(logits, (BATCH, LENGTH, VOCAB))


def with_logits_table(params: Any) -> Any:
    """`params` with the tied output table also laid out [D, V], for decoding only.

    A decode step's logits product has beams x sentences rows, and XLA:CPU runs products of
    few rows faster with the table's vocabulary axis last: on AVX-512, [4, 256] x [256, 8000]
    about 1.5x in isolation, whole W-small calls of one sentence with beam 4 1.14x and of four
    sentences greedy 1.09x, one sentence greedy no slower. At 128 rows (32 sentences, beam 4)
    calls were 4-8% slower, so the decoder reads the copy only up to `LOGITS_TABLE_ROWS`
    rows. It costs a second copy of the table (V D floats) while a decoder holds it; training
    and scoring leave it out. Untied models are returned as they are.
    """
    decoder = params["decoder"]
    if "logits_kernel" in decoder:  # untied: the logits have their own [D, V] kernel
        return params
    embedding = params.get("target_embedding") or params["shared_embedding"]
    table = jnp.transpose(embedding["embedding"])  # [V, D] -> [D, V], a copy
    return {**params, "decoder": {**decoder, LOGITS_TABLE: table}}


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
            self.shared_embedding = token_embedding(cfg.vocab_size, cfg)
            source = target = self.shared_embedding
        else:
            self.source_embedding = token_embedding(cfg.vocab_size, cfg)
            self.target_embedding = token_embedding(cfg.target_vocab, cfg)
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
        rolling: bool = False,
        **segments: jax.Array | None,
    ) -> jax.Array:
        """Logits [B, T, V]; see `Decoder.__call__` for the arguments."""
        return self.decoder(
            encoded, inputs, decoder_inputs,
            deterministic=deterministic, decode=decode, rolling=rolling, **segments,
        )  # fmt: skip

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
        self,
        encoded: jax.Array,
        inputs: jax.Array,
        num_rows: int,
        max_len: int,
        rolling: bool = False,
    ) -> None:
        """Fill the "cache" collection for decoding up to `max_len` tokens in `num_rows` rows.

        encoded [B', S, D] and inputs [B', S] are per sentence; num_rows = B' * beams. Apply
        with `mutable=["cache"]` and keep only the cache: the logits of the dummy target are
        dead code that jit removes. rolling: rows may be replaced between steps (beams 1;
        see `Decoder._decode_state`).
        """
        dummy = jnp.zeros((num_rows, max_len), jnp.int32)  # [B, L]
        self.decode(encoded, inputs, dummy, decode=True, rolling=rolling)

    def decode_step(self, ids: jax.Array) -> jax.Array:
        """One cached decoding step: previous tokens [B, 1] -> next-token logits [B, V]."""
        return self.decode(None, None, ids, decode=True)[:, 0]  # [B, 1, V] -> [B, V]
