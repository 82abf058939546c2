"""The encoder–decoder Transformer as Flax Linen modules; this file re-exports its public API.

Dimension letters used in shapes and einsums throughout the package:
  B batch (rows; in beam search B = sentences * beams), S source length, T target length,
  L max decode length, D d_model, H heads, K head_dim, F d_ff, V vocabulary;
  B' sentences (B' = B outside beam search), G and J beams of one sentence.

Decode mode (`decode=True`) keeps a "cache" collection. Per decoder layer: the self-attention
keys and values `[B', H, K, beams, L]`, where row b' * beams + g writes slot [b', :, :, g] at
the position it decodes, and the encoder–decoder keys and values `[B', H, K, S]`, projected
once per source sentence. Positions come last, the layout XLA's attention dots read, so no
decode step transposes a cache. Once for the decoder: the next position `index` [], the
source padding mask `source_mask` [B', 1, 1, S], and `origin` int32 [B, L], the row whose
slot holds each position of each row's hypothesis. After every step beam search reorders
only the cache leaves whose leading axis is B: `origin` follows the surviving hypotheses,
while the key and value caches, led by B', stay where they were written, and a step reads
each earlier position from the slot `origin` names (`DecodePosition.select`). Queries of the
beams of one sentence are folded into the query axis when they meet its keys, so no keys or
values are copied per beam. A rolling cache (`init_cache(..., rolling=True)`, beams 1) adds
`age` [B], each row's own position, so that rows can be refilled with new sentences between
steps (`tfjax.continuous`); its index runs round the L slots as a ring.
"""

from tfjax.model.config import PRESETS, TransformerConfig, preset
from tfjax.model.encoder_only import Classifier, MaskedLM
from tfjax.model.transformer import Transformer, with_logits_table

__all__ = [
    "PRESETS",
    "Classifier",
    "MaskedLM",
    "Transformer",
    "TransformerConfig",
    "preset",
    "with_logits_table",
]
