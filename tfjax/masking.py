"""BERT's masked-LM corruption, inside the jitted step: which pieces to predict and their inputs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Masking:
    """What `mask_tokens` selects and what it puts in the selected positions."""

    mask_id: int  # the tokenizer's "<mask>" piece
    vocab_size: int  # random replacements are drawn from [first_piece, vocab_size)
    first_piece: int = 4  # ids below (pad, unk, bos, eos) are never selected nor drawn
    rate: float = 0.15  # share of a row's pieces that are predicted
    mask_share: float = 0.8  # of those, replaced by mask_id
    random_share: float = 0.1  # of those, replaced by a random piece; the rest are kept

    def max_predictions(self, length: int) -> int:
        """P: predicted positions per row of `length` pieces (BERT's max_predictions_per_seq)."""
        return max(1, math.ceil(self.rate * length))


def mask_tokens(
    rng: jax.Array, inputs: jax.Array, masking: Masking
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Select round(rate * n) of each row's n maskable pieces (at least one) and corrupt them.

    Each selected piece becomes mask_id with probability mask_share, a random piece with
    probability random_share, and stays itself otherwise; the loss is taken on selected
    pieces only. A row's packed examples are treated as one sequence of pieces.

    Args:
      rng: a PRNG key; the same key selects the same pieces.
      inputs: int [B, S] piece ids, 0 on padding.
      masking: the rates and ids.
    Returns:
      corrupted inputs [B, S]; positions [B, P] of the predicted pieces; their original ids
      targets [B, P]; weights float32 [B, P], 1 on the real predictions (rows with fewer
      than P take the first positions and weight the rest 0).
    """
    select_rng, kind_rng, random_rng = jax.random.split(rng, 3)
    length = inputs.shape[1]
    predictions = masking.max_predictions(length)
    maskable = (inputs >= masking.first_piece) & (inputs != masking.mask_id)  # [B, S]
    count = jnp.sum(maskable, axis=1)  # [B]
    wanted = jnp.minimum(jnp.maximum(jnp.round(masking.rate * count), 1), predictions)
    wanted = jnp.where(count > 0, wanted, 0)  # [B]
    # A random order of each row's maskable positions: the first `wanted` are selected.
    keys = jnp.where(maskable, jax.random.uniform(select_rng, inputs.shape), -1.0)  # [B, S]
    _, positions = jax.lax.top_k(keys, predictions)  # [B, P]
    weights = (jnp.arange(predictions)[None] < wanted[:, None]).astype(jnp.float32)  # [B, P]
    targets = jnp.take_along_axis(inputs, positions, axis=1)  # [B, P]
    kind = jax.random.uniform(kind_rng, positions.shape)  # [B, P]
    random_ids = jax.random.randint(
        random_rng, positions.shape, masking.first_piece, masking.vocab_size
    )
    replacement = jnp.where(kind < masking.mask_share, masking.mask_id, targets)
    replacement = jnp.where(
        (kind >= masking.mask_share) & (kind < masking.mask_share + masking.random_share),
        random_ids,
        replacement,
    )
    replacement = jnp.where(weights > 0, replacement, targets)  # unselected stay as they are
    rows = jnp.arange(inputs.shape[0])[:, None]  # [B, 1]
    corrupted = inputs.at[rows, positions].set(replacement)
    return corrupted, positions, targets, weights
