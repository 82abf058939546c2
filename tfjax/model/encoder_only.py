"""Encoder-only Transformers: the masked-LM head and the sequence classifier.

Both are the encoder–decoder's `Encoder` (same layers, axis names and presets) over one
token table, with their parameters named alike ("token_embedding", "encoder"), so a
classifier, or an encoder–decoder, can start from a masked LM's encoder (`load_encoder`).
Inputs start with bos, which plays BERT's [CLS]: first-token pooling reads it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from tfjax.model.config import ACTIVATIONS, TransformerConfig
from tfjax.model.layers import (
    BATCH,
    EMBED,
    LENGTH,
    VOCAB,
    Dense,
    Dropout,
    constrain,
    layer_norm,
    token_embedding,
)
from tfjax.model.transformer import Encoder, tied_logits

# Where a model keeps the token table its encoder reads: an encoder-only model; an
# encoder–decoder sharing one table; one with a table per side.
ENCODER_TABLES = ("token_embedding", "shared_embedding", "source_embedding")


class MaskedLM(nn.Module):
    """Encoder plus a masked-LM head whose output layer is the token table, transposed."""

    config: TransformerConfig

    def setup(self) -> None:
        self.token_embedding = token_embedding(self.config.vocab_size, self.config)
        self.encoder = Encoder(self.config, self.token_embedding)

    def __call__(
        self,
        inputs: jax.Array,
        inputs_segment_ids: jax.Array | None = None,
        inputs_positions: jax.Array | None = None,
        *,
        predict_positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """float32 logits [B, S, V] over every position of inputs [B, S], or [B, P] at
        `predict_positions` [B, P] only (the head costs P / S as much)."""
        x = self.encoder(inputs, inputs_segment_ids, inputs_positions, deterministic=deterministic)
        if predict_positions is not None:
            x = jnp.take_along_axis(x, predict_positions[..., None], axis=1)  # [B, P, D]
        return self._head(x)

    @nn.compact
    def _head(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 [B, T, V]."""
        cfg = self.config
        if cfg.mlm_transform:
            x = Dense((cfg.d_model,), (EMBED, EMBED), cfg, name="transform")(x)
            x = layer_norm(cfg, "transform_norm")(ACTIVATIONS[cfg.activation](x))
        logits = tied_logits(x, self.token_embedding.embedding.astype(cfg.dtype))
        if cfg.output_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,))
            logits = logits + self.param("logits_bias", init, (cfg.vocab_size,), cfg.param_dtype)
        return constrain(logits, (BATCH, LENGTH, VOCAB))


class Classifier(nn.Module):
    """Encoder, pooling, (BERT's dense + tanh pooler), dropout and a dense layer to the classes.

    One example per row: packed rows are not supported (pooling would mix examples).
    """

    config: TransformerConfig

    def setup(self) -> None:
        if self.config.num_labels < 2:
            raise ValueError(f"a classifier needs num_labels >= 2, got {self.config.num_labels}")
        self.token_embedding = token_embedding(self.config.vocab_size, self.config)
        self.encoder = Encoder(self.config, self.token_embedding)

    def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """inputs [B, S] (bos first) -> float32 class logits [B, num_labels]."""
        x = self.encoder(inputs, deterministic=deterministic)  # [B, S, D]
        return self._head(x, inputs != self.config.pad_id, deterministic)

    @nn.compact
    def _head(self, x: jax.Array, keep: jax.Array, deterministic: bool) -> jax.Array:
        """x [B, S, D], keep [B, S] (False on padding) -> [B, C]."""
        cfg = self.config
        if cfg.pooling == "first":
            pooled = x[:, 0]  # [B, D]
        else:  # Mean over real pieces only, so padding never changes the result.
            weights = keep.astype(x.dtype)[..., None]  # [B, S, 1]
            pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
        if cfg.pooler:
            pooled = jnp.tanh(Dense((cfg.d_model,), (EMBED, EMBED), cfg, name="pooler")(pooled))
        pooled = Dropout(cfg.dropout_rate)(pooled, deterministic=deterministic)
        out = Dense((cfg.num_labels,), (EMBED, None), cfg, name="output")(pooled)
        return out.astype(jnp.float32)  # [B, C]


def load_encoder(params: dict[str, Any], encoder_params: dict[str, Any]) -> dict[str, Any]:
    """`params` with their token table and encoder replaced by `encoder_params`' (a masked
    LM's); raises ValueError naming the parameters that are missing or differ.

    `params` are an encoder-only model's, or an encoder–decoder's: its encoder and source
    table take the masked LM's, so with shared embeddings the decoder's table (its input and
    output layer) starts from the masked LM's too.
    """
    table = next(n for n in ENCODER_TABLES if n in params)
    out = dict(params)
    for name, source in ((table, "token_embedding"), ("encoder", "encoder")):
        new = traverse_util.flatten_dict(encoder_params[source], sep="/")
        old = traverse_util.flatten_dict(params[name], sep="/")
        problems = [f"{name}/{k} missing" for k in old.keys() - new.keys()]
        problems += [f"{name}/{k} not in this model" for k in new.keys() - old.keys()]
        problems += [
            f"{name}/{k} shape {new[k].shape}, here {old[k].shape}"
            for k in old.keys() & new.keys()
            if new[k].shape != old[k].shape
        ]
        if problems:
            raise ValueError("the encoder does not fit this model: " + "; ".join(sorted(problems)))
        out[name] = encoder_params[source]
    return out
