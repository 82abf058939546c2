"""Parity with an independent implementation: transformers' torch MarianMTModel, converted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MarianConfig, MarianMTModel

from tfjax.interop import from_marian, load_marian
from tfjax.model import Transformer

PAD = 60  # Marian's pad id is also its decoder start id
QK_GAIN = 4.0  # query and key projections' gain: attention logits of std ~QK_GAIN**2
# Bound on max |difference| / max |value| of the encoder output and the logits. torch and XLA
# round float32 differently; with these random parameters (logits up to ~24) the largest
# measured was 2.1e-6 (logits, opus-mt layout), the encoder's 8.3e-7. 1e-5 leaves a factor of
# about five for other CPUs; a swapped query/key weight or bias, or a swapped pair of
# LayerNorms, moves one or the other by 0.12 to 1.1.
RTOL = 1e-5


def _randomise(model: MarianMTModel) -> None:
    """Every trained parameter drawn at random, in place.

    transformers' own init (weights of std 0.02, zero biases, identity LayerNorms) makes
    attention nearly uniform and biases and LayerNorms no-ops, so a converter that swapped the
    query and key projections or their biases, or two LayerNorms, still matched it. Tied
    tables are one parameter, so they stay tied.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # the sinusoidal position tables are fixed, not trained
                continue
            if p.ndim == 1:  # biases, LayerNorm offsets and scales (around 1)
                p.normal_(1.0 if name.endswith("layer_norm.weight") else 0.0, 0.5)
            elif name.endswith(("proj.weight", "fc1.weight", "fc2.weight")):  # Linear [out, in]
                # Fan-in scaling keeps activations O(1) through the layers; with gain 1 on
                # queries and keys too, attention drifts towards uniform in the upper layers.
                gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.normal_(0.0, gain / p.shape[1] ** 0.5)
            else:  # token embeddings and the output projection
                p.normal_(0.0, 1.0)
        model.final_logits_bias.normal_()  # a buffer, not a parameter


def _marian(**overrides) -> MarianMTModel:
    """A small MarianMTModel with every trained parameter random (`_randomise`); no download."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=0,
        activation_function="swish", scale_embedding=True, dropout=0.1,
        attn_implementation="eager",  # returns the attention weights the entropy test reads
    )  # fmt: skip
    model = MarianMTModel(MarianConfig(**{**fields, **overrides})).eval()
    _randomise(model)
    return model


def _inputs(rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, ...]:
    src = rng.integers(1, PAD, size=(3, 9))
    src[0, 5:] = PAD  # padding on two of the three rows
    src[1, 8:] = PAD
    dec = rng.integers(1, vocab - 1, size=(3, 7))
    dec[:, 0] = PAD
    return src, (src != PAD).astype(np.int64), dec


def _compare(hf: MarianMTModel, converted) -> tuple[float, float]:
    """Max |encoder difference| over real positions and max |logits difference|, each over
    the largest |value| of transformers' output (float32 rounding grows with the values)."""
    src, mask, dec = _inputs(np.random.default_rng(0), converted.config.target_vocab)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
        )
    model = Transformer(converted.config)
    params = jax.tree_util.tree_map(jnp.asarray, converted.params)
    encoded = model.apply({"params": params}, jnp.asarray(src), method=model.encode)
    logits = model.apply({"params": params}, jnp.asarray(src), jnp.asarray(dec))
    reference = out.encoder_last_hidden_state.numpy() * mask[..., None]
    enc_diff = np.abs(np.asarray(encoded) * mask[..., None] - reference).max()
    logits_diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    return (
        float(enc_diff / np.abs(reference).max()),
        float(logits_diff / np.abs(out.logits.numpy()).max()),
    )


LAYOUTS = [
    {},  # opus-mt's layout: shared vocabulary, tied output, swish
    # transformers 5 unties every table here, whatever share_encoder_decoder_embeddings says
    dict(tie_word_embeddings=False),
    dict(
        share_encoder_decoder_embeddings=False,
        decoder_vocab_size=72,
        tie_word_embeddings=False,
        activation_function="gelu",
        scale_embedding=False,
    ),
]


def _normalised_entropy(weights: np.ndarray, allowed: np.ndarray) -> float:
    """Mean over query rows with two or more keys of entropy / log(number of keys).

    weights: [B, H, Q, K] attention probabilities; allowed: bool [B, Q, K], the keys each
    query may read. 1 is uniform attention, 0 a one-hot.
    """
    p = np.where(allowed[:, None], weights, 0.0)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0), axis=-1)
    keys = np.broadcast_to(allowed.sum(-1)[:, None], entropy.shape)  # [B, H, Q]
    rows = keys > 1
    return float(np.mean(entropy[rows] / np.log(keys[rows])))


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_random_parameters_make_attention_peaked(overrides):
    """The parity tests' premise: with `_marian`'s parameters attention is far from uniform,
    so a converter that mixes up queries and keys changes the output."""
    hf = _marian(**overrides)
    src, mask, dec = _inputs(np.random.default_rng(0), hf.config.vocab_size)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            output_attentions=True,
        )
    real = mask.astype(bool)  # [B, S]
    causal = np.tril(np.ones((dec.shape[1],) * 2, bool))[None]  # [1, T, T]
    kinds = {
        "encoder": (out.encoder_attentions, real[:, None, :] & real[:, :, None]),
        "decoder": (out.decoder_attentions, np.broadcast_to(causal, (len(dec), *causal.shape[1:]))),
        "cross": (
            out.cross_attentions,
            np.broadcast_to(real[:, None, :], (*dec.shape, src.shape[1])),
        ),
    }
    for kind, (layers, allowed) in kinds.items():
        for i, weights in enumerate(layers):
            # transformers' own init gives 1.00 in every layer; these parameters 0.48 at most.
            ratio = _normalised_entropy(weights.numpy(), allowed)
            assert ratio < 0.6, (kind, i, ratio)


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_converted_marian_matches_transformers(overrides):
    hf = _marian(**overrides)
    converted = from_marian(hf)
    assert converted.bos_id == PAD and converted.eos_id == 0 and converted.pad_id == PAD
    enc_diff, logits_diff = _compare(hf, converted)
    assert enc_diff <= RTOL and logits_diff <= RTOL, (enc_diff, logits_diff)


def test_load_marian_from_saved_directory(tmp_path):
    hf = _marian()
    hf.save_pretrained(tmp_path / "opus-mt-tiny")
    converted = load_marian(tmp_path / "opus-mt-tiny")
    enc_diff, logits_diff = _compare(hf, converted)
    assert enc_diff <= RTOL and logits_diff <= RTOL, (enc_diff, logits_diff)


def test_load_marian_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_marian(tmp_path / "nothing-here")


def test_mismatched_encoder_decoder_sizes_are_refused():
    with pytest.raises(ValueError, match="decoder_ffn_dim"):
        from_marian(_marian(decoder_ffn_dim=64))
