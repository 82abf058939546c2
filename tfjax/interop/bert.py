"""Conversion of Hugging Face BERT (masked LM, sequence classifier) into tfjax encoder-only models.

BERT is tfjax's encoder with learned positions, post-LN, biases everywhere, unscaled token
embeddings followed by a LayerNorm (`embedding_norm`), and LayerNorm epsilon 1e-12. Its
masked-LM head (dense, activation, LayerNorm, tied output with a bias) is `MaskedLM` with
`mlm_transform`; its classifier (the [CLS] vector through dense + tanh, then a dense layer)
is `Classifier` with `pooling="first"` and `pooler`.

Token types: tfjax has no token-type embeddings. BERT adds `token_type_embeddings[t]` to each
position's input; with token_type_ids all zero (what transformers uses when none are given,
and what single-sentence fill-mask and classification use) that is a constant row, added here
into every row of the learned position table. So the converted model computes what BERT does
for token_type_ids all zero only; sentence pairs (segment B, type 1) differ.

Padding: tfjax masks the keys whose id is the pad id, so parity needs transformers'
attention_mask to be `input_ids != pad_token_id` (and no real token equal to the pad id).

torch and transformers are imported lazily: only this module needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from tfjax.model import TransformerConfig
from tfjax.model.encoder_only import Classifier, MaskedLM

# Hugging Face activation names -> tfjax's. transformers' "gelu" is the exact (erf) GELU.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "swish",
    "swish": "swish",
}

_State = dict[str, np.ndarray]


def bert_config(hf_config: Any, *, num_labels: int = 0) -> TransformerConfig:
    """A TransformerConfig computing what a transformers `BertConfig` describes.

    Raises ValueError for what tfjax cannot represent: relative position embeddings, a
    decoder or cross-attention, an unknown activation, no pad id.
    """
    hf = hf_config
    kind = getattr(hf, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        # transformers 5 no longer implements relative positions, but a checkpoint trained
        # with them would convert to a different function.
        raise ValueError(f"BertConfig position_embedding_type={kind!r}: only 'absolute' converts")
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise ValueError("BertConfig is_decoder / add_cross_attention: only encoders convert")
    act = hf.hidden_act
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(
            f"BertConfig hidden_act={act!r} unsupported; expected {list(_ACTIVATIONS)}"
        )
    if hf.pad_token_id is None:
        # tfjax's encoder masks attention to the pad id's keys; it needs one.
        raise ValueError("BertConfig pad_token_id is None; tfjax masks padding by its id")
    return TransformerConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        activation=_ACTIVATIONS[act],
        positions="learned",
        max_len=hf.max_position_embeddings,
        pre_norm=False,
        layer_norm_epsilon=hf.layer_norm_eps,
        use_bias=True,
        scale_embeddings=False,
        embedding_norm=True,
        share_embeddings=True,
        tie_output=True,
        output_bias=True,
        mlm_transform=True,
        pooler=True,
        pooling="first",
        pad_id=hf.pad_token_id,
        dropout_rate=hf.hidden_dropout_prob,
        attention_dropout_rate=hf.attention_probs_dropout_prob,
        activation_dropout_rate=0.0,  # BERT has no dropout inside the feed-forward
        num_labels=num_labels,
    )


def _get(sd: _State, name: str) -> np.ndarray:
    if name not in sd:
        raise ValueError(f"the BERT state dict has no {name!r}; is this the right model class?")
    return sd[name]


def _linear(sd: _State, name: str) -> dict[str, np.ndarray]:
    """torch Linear [out, in] -> Dense {'kernel': [in, out], 'bias': [out]}."""
    return {"kernel": _get(sd, f"{name}.weight").T, "bias": _get(sd, f"{name}.bias")}


def _norm(sd: _State, name: str) -> dict[str, np.ndarray]:
    return {"scale": _get(sd, f"{name}.weight"), "bias": _get(sd, f"{name}.bias")}


def _attention(sd: _State, name: str, cfg: TransformerConfig) -> dict[str, Any]:
    """query/key/value [H*K, D] -> kernels [D, H, K]; output.dense [D, H*K] -> [H, K, D]."""
    heads, kv = cfg.num_heads, cfg.kv_dim
    out = {}
    for ours in ("query", "key", "value"):
        w = _linear(sd, f"{name}.self.{ours}")
        out[ours] = {
            "kernel": w["kernel"].reshape(cfg.d_model, heads, kv),  # [D, H*K] -> [D, H, K]
            "bias": w["bias"].reshape(heads, kv),  # [H*K] -> [H, K]
        }
    w = _linear(sd, f"{name}.output.dense")
    out["out"] = {"kernel": w["kernel"].reshape(heads, kv, cfg.d_model), "bias": w["bias"]}
    return out


def _encoder(sd: _State, cfg: TransformerConfig) -> dict[str, Any]:
    """The "token_embedding" and "encoder" subtrees, shared by both heads."""
    positions = _get(sd, "bert.embeddings.position_embeddings.weight")
    types = sd.get("bert.embeddings.token_type_embeddings.weight")
    if types is not None:
        positions = positions + types[0]  # token type 0 everywhere: see the module docstring
    encoder: dict[str, Any] = {
        "embedder": {
            "position_embedding": positions,
            "norm": _norm(sd, "bert.embeddings.LayerNorm"),
        }
    }
    for i in range(cfg.num_layers):
        p = f"bert.encoder.layer.{i}"
        encoder[f"layer_{i}"] = {
            "self_attention": _attention(sd, f"{p}.attention", cfg),
            "self_attention_norm": _norm(sd, f"{p}.attention.output.LayerNorm"),
            "mlp": {
                "wi": _linear(sd, f"{p}.intermediate.dense"),
                "wo": _linear(sd, f"{p}.output.dense"),
            },
            "mlp_norm": _norm(sd, f"{p}.output.LayerNorm"),
        }
    table = _get(sd, "bert.embeddings.word_embeddings.weight")
    return {"token_embedding": {"embedding": table}, "encoder": encoder}


def _checked(module: nn.Module, params: dict[str, Any]) -> dict[str, Any]:
    """`params` as float32 numpy arrays, after checking that they are exactly the tree
    `module.init` makes (same paths, same shapes): a missing or extra parameter raises."""
    init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    want = traverse_util.flatten_dict(nn.unbox(init)["params"], sep="/")
    have = traverse_util.flatten_dict(params, sep="/")
    problems = [f"{k} missing" for k in want.keys() - have.keys()]
    problems += [f"{k} not in the tfjax model" for k in have.keys() - want.keys()]
    problems += [
        f"{k}: converted shape {np.shape(have[k])}, tfjax expects {want[k].shape}"
        for k in want.keys() & have.keys()
        if np.shape(have[k]) != want[k].shape
    ]
    if problems:
        raise ValueError("converted BERT parameters do not fit: " + "; ".join(sorted(problems)))
    out = {k: np.asarray(v, np.float32) for k, v in have.items()}
    return traverse_util.unflatten_dict(out, sep="/")


def _state_dict(model: Any) -> _State:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def _load(model_or_path: Any, cls_name: str) -> Any:
    """An in-memory model as given, or `cls_name.from_pretrained` of a local directory."""
    if not isinstance(model_or_path, str | Path):
        return model_or_path
    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a save_pretrained directory")
    import transformers

    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    # transformers fills weights the directory lacks (e.g. a classifier head loaded from a
    # masked-LM checkpoint) with random ones and only warns; converting those is a mistake.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path} lacks weights of a {cls_name}: {missing}")
    return model.eval()


def from_bert_masked_lm(model_or_path: Any) -> tuple[TransformerConfig, dict[str, Any]]:
    """(config, params) for `MaskedLM` from a transformers `BertForMaskedLM` (torch) or a
    local directory its `save_pretrained` wrote (no download)."""
    model = _load(model_or_path, "BertForMaskedLM")
    cfg = bert_config(model.config)
    sd = _state_dict(model)
    table = _get(sd, "bert.embeddings.word_embeddings.weight")
    decoder = _get(sd, "cls.predictions.decoder.weight")
    # MaskedLM's output layer is the token table itself; an untied decoder cannot convert.
    if decoder.shape != table.shape or not np.array_equal(decoder, table):
        raise ValueError("BertForMaskedLM's decoder weight differs from its word embeddings")
    # The decoder Linear's bias is what the forward pass adds; it is cls.predictions.bias.
    bias = sd.get("cls.predictions.decoder.bias")
    params = _encoder(sd, cfg)
    params["transform"] = _linear(sd, "cls.predictions.transform.dense")
    params["transform_norm"] = _norm(sd, "cls.predictions.transform.LayerNorm")
    params["logits_bias"] = bias if bias is not None else _get(sd, "cls.predictions.bias")
    return cfg, _checked(MaskedLM(cfg), params)


def from_bert_classifier(model_or_path: Any) -> tuple[TransformerConfig, dict[str, Any]]:
    """(config, params) for `Classifier` from a transformers `BertForSequenceClassification`
    (torch, single-label classification) or a local directory its `save_pretrained` wrote."""
    model = _load(model_or_path, "BertForSequenceClassification")
    hf = model.config
    problem = getattr(hf, "problem_type", None)
    # None with num_labels >= 2 is what transformers treats as single-label for integer labels.
    if problem not in (None, "single_label_classification") or hf.num_labels < 2:
        raise ValueError(
            f"BertForSequenceClassification with problem_type={problem!r}, "
            f"num_labels={hf.num_labels}: only single-label classification with >= 2 classes "
            "converts to a tfjax Classifier"
        )
    # classifier_dropout, when set, has no field of its own: tfjax drops the pooled vector at
    # dropout_rate. Inference is unaffected; fine-tuning uses hidden_dropout_prob there.
    cfg = bert_config(hf, num_labels=hf.num_labels)
    sd = _state_dict(model)
    params = _encoder(sd, cfg)
    params["pooler"] = _linear(sd, "bert.pooler.dense")
    params["output"] = _linear(sd, "classifier")
    return cfg, _checked(Classifier(cfg), params)
