"""The model's configuration: `TransformerConfig`, its choices, and the named presets."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "swish": nn.swish,
}
POSITIONS = ("sinusoidal", "sinusoidal_half", "learned")
POOLINGS = ("first", "mean")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every size and switch of the model; frozen so it can be a static jit argument."""

    vocab_size: int = 32000  # source vocabulary (the joint one when embeddings are shared)
    target_vocab_size: int | None = None  # None: the same size as vocab_size
    share_embeddings: bool = True  # one table for source and target tokens
    tie_output: bool = True  # logits use the target embedding table, transposed
    output_bias: bool = False  # a learned bias added to the logits (Marian has one)
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model), as the paper
    pad_id: int = 0  # padding id: masked out of attention over the source and of the loss
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
    embedding_norm: bool = False  # LayerNorm on token + position embeddings (BERT)
    # Encoder-only heads (tfjax.model.encoder_only); the encoder–decoder ignores them.
    mlm_transform: bool = False  # masked-LM head: dense, activation, LayerNorm before logits
    num_labels: int = 0  # classifier: number of classes (0 for every other model)
    pooling: str = "first"  # classifier: "first" (the bos / [CLS] piece) or "mean" over pieces
    pooler: bool = False  # classifier: dense + tanh on the pooled vector (BERT's pooler)
    dtype: Any = jnp.float32  # compute dtype (e.g. jnp.bfloat16)
    param_dtype: Any = jnp.float32  # storage dtype of the parameters

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}; expected one of {POSITIONS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLINGS}")
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
