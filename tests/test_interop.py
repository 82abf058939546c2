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


def _marian(**overrides) -> MarianMTModel:
    """A randomly initialised small MarianMTModel; no download."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=0,
        activation_function="swish", scale_embedding=True, dropout=0.1,
    )  # fmt: skip
    model = MarianMTModel(MarianConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # non-zero so the converted logits bias is checked too
        model.final_logits_bias.normal_()
    return model


def _inputs(rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, ...]:
    src = rng.integers(1, PAD, size=(3, 9))
    src[0, 5:] = PAD  # padding on two of the three rows
    src[1, 8:] = PAD
    dec = rng.integers(1, vocab - 1, size=(3, 7))
    dec[:, 0] = PAD
    return src, (src != PAD).astype(np.int64), dec


def _compare(hf: MarianMTModel, converted) -> tuple[float, float]:
    """Max |encoder difference| over real positions and max |logits difference|."""
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
    enc_diff = np.abs(np.asarray(encoded) - out.encoder_last_hidden_state.numpy()) * mask[..., None]
    return float(enc_diff.max()), float(np.abs(np.asarray(logits) - out.logits.numpy()).max())


@pytest.mark.parametrize(
    "overrides",
    [
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
    ],
)
def test_converted_marian_matches_transformers(overrides):
    hf = _marian(**overrides)
    converted = from_marian(hf)
    assert converted.bos_id == PAD and converted.eos_id == 0 and converted.pad_id == PAD
    enc_diff, logits_diff = _compare(hf, converted)
    assert enc_diff <= 1e-4 and logits_diff <= 1e-4, (enc_diff, logits_diff)


def test_load_marian_from_saved_directory(tmp_path):
    hf = _marian()
    hf.save_pretrained(tmp_path / "opus-mt-tiny")
    converted = load_marian(tmp_path / "opus-mt-tiny")
    enc_diff, logits_diff = _compare(hf, converted)
    assert enc_diff <= 1e-4 and logits_diff <= 1e-4, (enc_diff, logits_diff)


def test_load_marian_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_marian(tmp_path / "nothing-here")


def test_mismatched_encoder_decoder_sizes_are_refused():
    with pytest.raises(ValueError, match="decoder_ffn_dim"):
        from_marian(_marian(decoder_ffn_dim=64))
