"""Encoder-only models: BERT masking, the masked-LM and classifier losses, padding, init_from
(into a classifier and into an encoder–decoder)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_in_process
from flax import linen as nn

from configs import default
from tfjax import checkpoint, evaluate, train_lib
from tfjax.masking import Masking, mask_tokens
from tfjax.model import Classifier, MaskedLM, Transformer, preset
from tfjax.model.encoder_only import load_encoder

MASKING = Masking(mask_id=4, vocab_size=300)


def _rows(rng: np.random.Generator, rows: int = 64, length: int = 128) -> np.ndarray:
    """bos, random pieces (some of them <mask> or unk), eos, then padding; lengths vary."""
    out = np.zeros((rows, length), np.int32)
    for r in range(rows):
        n = rng.integers(3, length - 2)
        out[r, 0], out[r, n + 1] = 2, 3
        out[r, 1 : n + 1] = rng.integers(1, 300, size=n)
    return out


def test_masking_statistics():
    inputs = _rows(np.random.default_rng(0), rows=256)
    corrupted, positions, targets, weights = map(
        np.asarray, mask_tokens(jax.random.key(1), jnp.asarray(inputs), MASKING)
    )
    maskable = (inputs >= 4) & (inputs != 4)
    rows = np.arange(len(inputs))[:, None]
    # Exactly round(15%) of each row's maskable pieces, at least one, never a special piece.
    assert np.array_equal(weights.sum(1), np.maximum(np.round(0.15 * maskable.sum(1)), 1))
    chosen = positions[weights > 0], np.broadcast_to(rows, positions.shape)[weights > 0]
    assert maskable[chosen[1], chosen[0]].all()
    assert len(set(zip(*chosen, strict=True))) == len(chosen[0])  # no position twice
    assert np.array_equal(targets, np.take_along_axis(inputs, positions, 1))
    # Nothing outside the selected positions changes.
    selected = np.zeros_like(inputs, bool)
    selected[chosen[1], chosen[0]] = True
    assert np.array_equal(corrupted[~selected], inputs[~selected])
    # 80% <mask>, 10% random, 10% kept: within 4 binomial standard deviations.
    new = corrupted[chosen[1], chosen[0]]
    old = inputs[chosen[1], chosen[0]]
    n = len(new)
    masked, kept = np.mean(new == 4), np.mean(new == old)
    assert abs(masked - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
    # A random draw equals the original 1 time in 296; those count as kept.
    assert abs(kept - (0.1 + 0.1 / 296)) < 4 * np.sqrt(0.1 * 0.9 / n)
    assert ((new >= 4) & (new < 300)).all()
    # The same key masks the same way; another key does not.
    again = mask_tokens(jax.random.key(1), jnp.asarray(inputs), MASKING)[0]
    other = mask_tokens(jax.random.key(2), jnp.asarray(inputs), MASKING)[0]
    assert np.array_equal(again, corrupted) and not np.array_equal(other, corrupted)


def test_masking_rows_without_pieces_predict_nothing():
    inputs = jnp.array([[2, 3, 0, 0], [2, 7, 3, 0]])
    _, positions, _, weights = mask_tokens(jax.random.key(0), inputs, MASKING)
    assert weights.tolist() == [[0.0], [1.0]] and int(positions[1, 0]) == 1


@pytest.fixture(scope="module")
def mlm():
    cfg = preset("tiny", vocab_size=300, mlm_transform=True, output_bias=True, embedding_norm=True)
    model = MaskedLM(cfg)
    inputs = jnp.asarray(_rows(np.random.default_rng(3), rows=4, length=24))
    params = nn.unbox(model.init(jax.random.key(0), inputs)["params"])
    # Non-zero biases and LayerNorm shifts, so a head that skipped one would differ.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    return model, params, inputs


def test_masked_lm_loss_is_cross_entropy_of_the_full_forward_pass(mlm):
    model, params, inputs = mlm
    batch = {"inputs": inputs}
    rng = jax.random.key(7)
    metrics = train_lib.eval_step(params, batch, rng, model=model, masking=MASKING)
    # Reference: the same corruption, the full [B, S, V] forward pass, NumPy log-softmax.
    corrupted, positions, targets, weights = map(np.asarray, mask_tokens(
        jax.random.fold_in(rng, train_lib._MASKING_STREAM), inputs, MASKING
    ))  # fmt: skip
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(corrupted)), np.float64)
    picked = np.take_along_axis(logits, positions[..., None], 1)  # [B, P, V]
    log_probs = picked - np.log(np.exp(picked).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(metrics["nll"]), (nll * weights).sum(), rtol=1e-5)
    assert float(metrics["tokens"]) == weights.sum()
    hits = (picked.argmax(-1) == targets) * weights
    assert float(metrics["correct"]) == hits.sum()


def _classifier(pooling: str):
    cfg = preset("tiny", vocab_size=300, num_labels=3, pooling=pooling, pooler=True)
    model = Classifier(cfg)
    inputs = jnp.asarray(_rows(np.random.default_rng(4), rows=4, length=20))
    params = nn.unbox(model.init(jax.random.key(1), inputs)["params"])
    return model, params, inputs


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_classifier_ignores_padding(pooling):
    model, params, inputs = _classifier(pooling)
    logits = model.apply({"params": params}, inputs)
    wider = jnp.pad(inputs, ((0, 0), (0, 12)))  # more padding columns
    np.testing.assert_allclose(model.apply({"params": params}, wider), logits, atol=1e-5)
    # Each row alone gives its own logits: rows do not see each other.
    alone = model.apply({"params": params}, inputs[2:3, : int((inputs[2] > 0).sum())])
    np.testing.assert_allclose(alone[0], logits[2], atol=1e-5)
    # A real piece changed does change them (the test would catch a constant output).
    assert not np.allclose(model.apply({"params": params}, inputs.at[:, 1].set(9)), logits)


def test_classifier_loss_and_padding_rows():
    model, params, inputs = _classifier("mean")
    labels = jnp.array([0, 2, 1, -1])  # the last row is a padding row: weight 0
    metrics = train_lib.eval_step(params, {"inputs": inputs, "label": labels}, model=model)
    logits = np.asarray(model.apply({"params": params}, inputs), np.float64)[:3]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(3), [0, 2, 1]].sum()
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    assert float(metrics["tokens"]) == 3
    assert float(metrics["correct"]) == np.sum(logits.argmax(-1) == [0, 2, 1])


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    # F1: class 0: 2*2/(2+3) = 0.8; class 1: 2*1/(2+2) = 0.5; class 2: 2*1/(2+1) = 2/3.
    assert evaluate.macro_f1(labels, predicted, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert evaluate.macro_f1(labels, predicted, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_load_encoder_names_what_does_not_fit(mlm):
    model, params, _ = mlm
    inputs = jnp.ones((1, 8), jnp.int32)
    plain = Classifier(preset("tiny", vocab_size=300, num_labels=2))
    target = nn.unbox(plain.init(jax.random.key(0), inputs)["params"])
    with pytest.raises(ValueError, match="embedder/norm/scale not in this model"):
        load_encoder(target, params)


def test_classifier_starts_from_the_masked_lm(mlm_workdir, classifier_workdir):
    """The classifier's first checkpoint differs from the masked LM by training only: its
    encoder was the masked LM's at step 0, so it stays closer to it than a fresh init."""
    _, lm, _, _ = checkpoint.restore_for_inference(mlm_workdir)
    cfg, cls, _, meta = checkpoint.restore_for_inference(classifier_workdir)
    assert meta["labels"] == ["NEGATIVE", "POSITIVE"] and cfg.num_labels == 2
    table = np.asarray(lm["token_embedding"]["embedding"])
    moved = np.abs(np.asarray(cls["token_embedding"]["embedding"]) - table).max()
    # 60 Adam steps move a weight by at most about 60 learning rates (3e-3).
    assert moved < 60 * 3e-3 < np.abs(table).max()
    assert (classifier_workdir / "spm.model").read_bytes() == (
        mlm_workdir / "spm.model"
    ).read_bytes()


def test_load_encoder_into_an_encoder_decoder_takes_its_encoder_and_shared_table():
    cfg = preset("tiny", vocab_size=300)
    inputs = jnp.ones((1, 8), jnp.int32)
    lm = nn.unbox(MaskedLM(cfg).init(jax.random.key(1), inputs)["params"])
    fresh = nn.unbox(Transformer(cfg).init(jax.random.key(0), inputs, inputs)["params"])
    loaded = load_encoder(fresh, lm)
    same = jax.tree_util.tree_map(np.array_equal, loaded["encoder"], lm["encoder"])
    assert all(jax.tree_util.tree_leaves(same))
    assert np.array_equal(
        loaded["shared_embedding"]["embedding"], lm["token_embedding"]["embedding"]
    )
    assert loaded["decoder"] is fresh["decoder"]  # the decoder starts fresh
    deeper = nn.unbox(
        Transformer(preset("tiny", vocab_size=300, num_layers=3)).init(
            jax.random.key(0), inputs, inputs
        )["params"]
    )
    with pytest.raises(ValueError, match="encoder/layer_2/.* missing"):
        load_encoder(deeper, lm)


def test_encoder_decoder_training_starts_from_the_masked_lm(mlm_workdir, corpus, tmp_path):
    """A translation run with init_from: after a few Adam steps its encoder and shared table
    are still within a few learning rates of the masked LM's, and it reads its tokenizer."""
    # The default rate, so the step is the one the suite's other runs compiled.
    steps, lr = 6, default.get_config().learning_rate
    workdir = tmp_path / "translation"
    recipe = ["--config.dataset=folder", "--config.source_lang=de", "--config.target_lang=en",
              f"--config.data_dir={corpus}", "--config.test_split="]  # fmt: skip
    train_in_process(
        workdir, *recipe, f"--config.num_train_steps={steps}", f"--config.init_from={mlm_workdir}"
    )
    _, lm, _, _ = checkpoint.restore_for_inference(mlm_workdir)
    _, mt, _, _ = checkpoint.restore_for_inference(workdir)
    pairs = [(mt["shared_embedding"], lm["token_embedding"]), (mt["encoder"], lm["encoder"])]
    moved = max(
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for ours, theirs in pairs
        for a, b in zip(*map(jax.tree_util.tree_leaves, (ours, theirs)), strict=True)
    )
    # An Adam step moves a weight by about its learning rate at most; a fresh init is far off.
    table = np.asarray(lm["token_embedding"]["embedding"])
    assert moved < 3 * steps * lr < np.abs(table).max()
    assert (workdir / "spm.model").read_bytes() == (mlm_workdir / "spm.model").read_bytes()
    # A resume takes its weights from the checkpoint: a masked LM moved away since is not needed.
    moved_away = f"--config.init_from={tmp_path / 'moved'}"
    train_in_process(workdir, *recipe, f"--config.num_train_steps={steps + 1}", moved_away)
    assert (workdir / "checkpoints" / str(steps + 1)).is_dir()
