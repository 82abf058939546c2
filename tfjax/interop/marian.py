"""Conversion of Hugging Face Marian (opus-mt) models into tfjax configs and parameters.

Marian is this architecture with post-LN, biases everywhere, half-sin/half-cos positions,
sqrt(d_model)-scaled embeddings, a logits bias and LayerNorm epsilon 1e-5, so a converted model
computes the same function. torch and transformers are imported lazily: only this module
needs them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from tfjax.model import TransformerConfig

# Hugging Face activation names -> tfjax's.
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "swish",
    "silu": "swish",
}


@dataclasses.dataclass(frozen=True)
class MarianImport:
    """A converted model: its config, parameters and special token ids."""

    config: TransformerConfig
    params: dict[str, Any]  # nested dict of np.float32 arrays, the tree Transformer.init makes
    bos_id: int  # Marian's decoder_start_token_id (its pad id)
    eos_id: int
    pad_id: int


def config_from_marian(hf: Any, **overrides: Any) -> TransformerConfig:
    """A TransformerConfig computing what a transformers `MarianConfig` describes."""
    pairs = [
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ]
    for enc, dec in pairs:
        if getattr(hf, enc) != getattr(hf, dec):
            raise ValueError(f"MarianConfig {enc}={getattr(hf, enc)} != {dec}={getattr(hf, dec)}")
    if hf.activation_function not in _ACTIVATIONS:
        raise ValueError(f"MarianConfig activation_function={hf.activation_function!r} unsupported")
    shared = bool(hf.share_encoder_decoder_embeddings)
    fields = dict(
        vocab_size=hf.vocab_size,
        target_vocab_size=None if shared else hf.decoder_vocab_size,
        share_embeddings=shared,
        tie_output=bool(hf.tie_word_embeddings),
        output_bias=True,
        scale_embeddings=bool(hf.scale_embedding),
        pad_id=hf.pad_token_id,
        d_model=hf.d_model,
        num_heads=hf.encoder_attention_heads,
        d_ff=hf.encoder_ffn_dim,
        num_layers=hf.encoder_layers,
        num_decoder_layers=hf.decoder_layers,
        activation=_ACTIVATIONS[hf.activation_function],
        pre_norm=False,
        layer_norm_epsilon=1e-5,  # torch.nn.LayerNorm's default, which Marian uses
        use_bias=True,
        positions="sinusoidal_half",
        max_len=hf.max_position_embeddings,
        dropout_rate=hf.dropout,
        attention_dropout_rate=hf.attention_dropout,
        activation_dropout_rate=hf.activation_dropout,
    )
    return TransformerConfig(**{**fields, **overrides})


def _linear(sd: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """torch Linear [out, in] -> Dense {'kernel': [in, out], 'bias': [out]}."""
    return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _attention(sd: dict[str, np.ndarray], name: str, cfg: TransformerConfig) -> dict[str, Any]:
    """q/k/v [H*K, D] -> kernels [D, H, K]; out [D, H*K] -> [H, K, D]."""
    heads, kv = cfg.num_heads, cfg.kv_dim
    out = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        w = _linear(sd, f"{name}.{theirs}")
        out[ours] = {
            "kernel": w["kernel"].reshape(cfg.d_model, heads, kv),  # [D, H*K] -> [D, H, K]
            "bias": w["bias"].reshape(heads, kv),  # [H*K] -> [H, K]
        }
    w = _linear(sd, f"{name}.out_proj")
    out["out"] = {"kernel": w["kernel"].reshape(heads, kv, cfg.d_model), "bias": w["bias"]}
    return out


def _norm(sd: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _layer(sd: dict[str, np.ndarray], prefix: str, cfg: TransformerConfig, cross: bool) -> dict:
    layer = {
        "self_attention": _attention(sd, f"{prefix}.self_attn", cfg),
        "self_attention_norm": _norm(sd, f"{prefix}.self_attn_layer_norm"),
        "mlp": {"wi": _linear(sd, f"{prefix}.fc1"), "wo": _linear(sd, f"{prefix}.fc2")},
        "mlp_norm": _norm(sd, f"{prefix}.final_layer_norm"),
    }
    if cross:
        layer["cross_attention"] = _attention(sd, f"{prefix}.encoder_attn", cfg)
        layer["cross_attention_norm"] = _norm(sd, f"{prefix}.encoder_attn_layer_norm")
    return layer


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: TransformerConfig) -> dict[str, Any]:
    """A MarianMTModel state dict (numpy values) -> the parameter tree of Transformer(cfg)."""
    params: dict[str, Any] = {
        "encoder": {
            f"layer_{i}": _layer(sd, f"model.encoder.layers.{i}", cfg, cross=False)
            for i in range(cfg.num_layers)
        },
        "decoder": {
            f"layer_{i}": _layer(sd, f"model.decoder.layers.{i}", cfg, cross=True)
            for i in range(cfg.decoder_layers)
        },
    }
    if cfg.share_embeddings:
        params["shared_embedding"] = {"embedding": sd["model.encoder.embed_tokens.weight"]}
    else:
        params["source_embedding"] = {"embedding": sd["model.encoder.embed_tokens.weight"]}
        params["target_embedding"] = {"embedding": sd["model.decoder.embed_tokens.weight"]}
    if not cfg.tie_output:
        params["decoder"]["logits_kernel"] = sd["lm_head.weight"].T  # [V, D] -> [D, V]
    params["decoder"]["logits_bias"] = sd["final_logits_bias"].reshape(-1)  # [1, V] -> [V]
    return params


def _tying(sd: dict[str, np.ndarray]) -> dict[str, bool]:
    """Which tables really are one, read from the weights.

    The config's flags are not enough: with transformers 5, share_encoder_decoder_embeddings
    with tie_word_embeddings=False leaves encoder, decoder and output tables separate.
    """
    encoder, decoder = (
        sd["model.encoder.embed_tokens.weight"],
        sd["model.decoder.embed_tokens.weight"],
    )
    shared = encoder.shape == decoder.shape and np.array_equal(encoder, decoder)
    return dict(share_embeddings=shared, tie_output=np.array_equal(sd["lm_head.weight"], decoder))


def from_marian(model: Any, **overrides: Any) -> MarianImport:
    """Convert an in-memory transformers `MarianMTModel` (torch)."""
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    tying = _tying(sd)
    if not tying["share_embeddings"]:
        tying["target_vocab_size"] = sd["model.decoder.embed_tokens.weight"].shape[0]
    cfg = config_from_marian(model.config, **{**tying, **overrides})
    hf = model.config
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, int) else hf.eos_token_id[0]
    return MarianImport(
        config=cfg,
        params=params_from_state_dict(sd, cfg),
        bos_id=hf.decoder_start_token_id,
        eos_id=eos,
        pad_id=hf.pad_token_id,
    )


def load_marian(path: str | Path, **overrides: Any) -> MarianImport:
    """Convert a local directory written by `MarianMTModel.save_pretrained` (no download)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a save_pretrained directory")
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(path, local_files_only=True)
    return from_marian(model.eval(), **overrides)
