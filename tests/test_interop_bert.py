"""Parity with an independent implementation: transformers' torch BERT, converted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from tfjax.interop import bert_config, from_bert_classifier, from_bert_masked_lm
from tfjax.model import Classifier, MaskedLM

QK_GAIN = 4.0  # query and key projections' gain: peaked attention, as in test_interop.py
# Bound on max |difference| / max |value| of the logits at real positions. torch and XLA round
# float32 differently; with these random parameters (masked-LM logits up to ~15) the largest
# measured was 6.7e-7 (masked LM), 4.6e-7 (classifier). 1e-5 leaves room for other CPUs; the
# mapping errors in test_a_wrong_mapping_is_caught move the logits by 0.46 to 0.68.
RTOL = 1e-5


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter drawn at random, in place.

    transformers' init (zero biases, identity LayerNorms, weights of std 0.02) would hide a
    misplaced bias or LayerNorm and make attention near uniform. The decoder of the masked LM
    is the word-embedding Parameter itself (named once), so it stays tied.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases, LayerNorm offsets and scales (around 1)
                p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.5)
            elif "embeddings" in name:  # word, position and token-type tables
                p.normal_(0.0, 1.0)
            else:  # Linear [out, in]; fan-in scaling keeps activations O(1) through the layers
                gain = QK_GAIN if name.endswith(("query.weight", "key.weight")) else 1.0
                p.normal_(0.0, gain / p.shape[1] ** 0.5)


def _config(**overrides) -> BertConfig:
    fields = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_act="gelu",
        attn_implementation="eager",
    )  # fmt: skip
    return BertConfig(**{**fields, **overrides})


def _bert(cls, **overrides):
    torch.manual_seed(0)
    model = cls(_config(**overrides)).eval()
    _randomise(model)
    return model


def _ids(pad: int, vocab: int) -> np.ndarray:
    """[3, 11] ids, [CLS]-like first token, rows of lengths 11, 8 and 4 (then pad)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(3, 11))
    ids[ids == pad] = pad + 1  # no real token is the pad id: tfjax masks keys by id
    ids[1, 8:] = pad
    ids[2, 4:] = pad
    return ids


def _hf_logits(model, ids: np.ndarray, pad: int) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor((ids != pad).astype(np.int64))
        )
    return out.logits.numpy()


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _mlm_error(hf: BertForMaskedLM, cfg, params) -> float:
    pad = hf.config.pad_token_id
    ids = _ids(pad, cfg.vocab_size)
    ref = _hf_logits(hf, ids, pad)
    logits = MaskedLM(cfg).apply({"params": params}, jnp.asarray(ids))
    real = ids != pad
    return _relative(np.asarray(logits)[real], ref[real])


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(pad_token_id=5, hidden_act="gelu_new"), dict(hidden_act="relu")],
)
def test_masked_lm_logits_match_transformers(overrides):
    hf = _bert(BertForMaskedLM, **overrides)
    cfg, params = from_bert_masked_lm(hf)
    assert cfg.pad_id == hf.config.pad_token_id and cfg.layer_norm_epsilon == 1e-12
    assert _mlm_error(hf, cfg, params) < RTOL


def test_masked_lm_predict_positions_match_transformers():
    hf = _bert(BertForMaskedLM)
    cfg, params = from_bert_masked_lm(hf)
    ids = _ids(0, cfg.vocab_size)
    ref = _hf_logits(hf, ids, 0)
    where = np.array([[1, 5, 10], [0, 3, 7], [3, 2, 1]])  # real positions of each row
    logits = MaskedLM(cfg).apply(
        {"params": params}, jnp.asarray(ids), predict_positions=jnp.asarray(where)
    )
    assert logits.shape == (3, 3, cfg.vocab_size)
    assert _relative(logits, np.take_along_axis(ref, where[..., None], axis=1)) < RTOL


def test_classifier_logits_match_transformers():
    hf = _bert(BertForSequenceClassification, num_labels=3)
    cfg, params = from_bert_classifier(hf)
    assert cfg.num_labels == 3 and cfg.pooler and cfg.pooling == "first"
    ids = _ids(0, cfg.vocab_size)  # three rows of different lengths in one batch
    logits = Classifier(cfg).apply({"params": params}, jnp.asarray(ids))
    assert logits.shape == (3, 3)
    assert _relative(logits, _hf_logits(hf, ids, 0)) < RTOL


def test_a_wrong_mapping_is_caught():
    """The tolerance means something: query and key swapped, or token type 0 left out of the
    position table, move the logits far beyond RTOL with these random parameters."""
    hf = _bert(BertForMaskedLM)
    cfg, params = from_bert_masked_lm(hf)
    swapped = jax.tree_util.tree_map(lambda x: x, params)  # a copy of the nested dicts
    attention = swapped["encoder"]["layer_0"]["self_attention"]
    attention["query"], attention["key"] = attention["key"], attention["query"]
    assert _mlm_error(hf, cfg, swapped) > 1e3 * RTOL
    no_types = jax.tree_util.tree_map(lambda x: x, params)
    types = hf.bert.embeddings.token_type_embeddings.weight.detach().numpy()
    no_types["encoder"]["embedder"]["position_embedding"] = (
        params["encoder"]["embedder"]["position_embedding"] - types[0]
    )
    assert _mlm_error(hf, cfg, no_types) > 1e3 * RTOL


def test_save_pretrained_round_trip(tmp_path):
    for cls, convert, kw in (
        (BertForMaskedLM, from_bert_masked_lm, {}),
        (BertForSequenceClassification, from_bert_classifier, dict(num_labels=3)),
    ):
        hf = _bert(cls, **kw)
        path = tmp_path / cls.__name__
        hf.save_pretrained(path)
        cfg, params = convert(hf)
        loaded_cfg, loaded = convert(path)
        assert loaded_cfg == cfg
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
        loaded_cfg, loaded = convert(str(path))
        assert loaded_cfg == cfg


def test_missing_directory_and_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        from_bert_masked_lm(tmp_path / "nowhere")
    # A masked-LM checkpoint has no pooler or classifier: transformers would make them up.
    _bert(BertForMaskedLM).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match="lacks weights"):
        from_bert_classifier(tmp_path / "mlm")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_labels=1), "problem_type"),  # one label: regression
        (dict(num_labels=3, problem_type="regression"), "problem_type"),
        (dict(num_labels=3, problem_type="multi_label_classification"), "problem_type"),
    ],
)
def test_classifier_refusals(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_bert_classifier(_bert(BertForSequenceClassification, **overrides))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(position_embedding_type="relative_key"), "position_embedding_type"),
        (dict(is_decoder=True), "is_decoder"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(hidden_act="gelu_fast"), "hidden_act"),
        (dict(pad_token_id=None), "pad_token_id"),
    ],
)
def test_config_refusals(overrides, match):
    with pytest.raises(ValueError, match=match):
        bert_config(_config(**overrides))


def test_untied_decoder_is_refused():
    hf = _bert(BertForMaskedLM, tie_word_embeddings=False)
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.normal_()
    assert not torch.equal(
        hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight
    )
    with pytest.raises(ValueError, match="decoder weight differs"):
        from_bert_masked_lm(hf)
