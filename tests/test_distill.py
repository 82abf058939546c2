"""Token-level knowledge distillation: the loss, the frozen teacher, and a distilled run."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_command, train_losses

from tfjax import distill, train_lib
from tfjax.distill import Distillation
from tfjax.model import Transformer, preset
from tfjax.translator import Translator


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.7, 2.0), (1.0, 0.5)])
def test_loss_matches_numpy(alpha, temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 5, 11)).astype(np.float32)
    teacher = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
    targets = rng.integers(0, 11, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    ce, _ = train_lib.cross_entropy(jnp.asarray(student), targets, weights, 0.1)
    got = distill.loss_sum(
        Distillation(Transformer(preset("tiny")), alpha, temperature),
        jnp.asarray(student),
        jnp.asarray(teacher),
        ce,
        jnp.asarray(weights),
    )
    p_t = _np_log_softmax(teacher / temperature)
    p_s = _np_log_softmax(student / temperature)
    kl = (np.exp(p_t) * (p_t - p_s)).sum(-1)  # [B, T]
    expected = alpha * temperature**2 * (kl * weights).sum() + (1 - alpha) * float(ce)
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def pair():
    """A tiny student, a wider teacher (its own config) and a batch."""
    rng = np.random.default_rng(1)
    targets = rng.integers(4, 64, size=(4, 6)).astype(np.int32)
    targets[:, 4:] = 0
    decoder_inputs = np.concatenate([np.full((4, 1), 2, np.int32), targets[:, :-1]], axis=1)
    decoder_inputs[targets == 0] = 0
    batch = dict(
        inputs=rng.integers(4, 64, size=(4, 7)).astype(np.int32),
        targets=targets,
        decoder_inputs=decoder_inputs,
    )
    student, teacher = Transformer(preset("tiny")), Transformer(preset("tiny", d_model=48))
    inputs = train_lib.model_inputs(batch)
    s_params = student.init(jax.random.key(0), **inputs)["params"]
    t_params = teacher.init(jax.random.key(1), **inputs)["params"]
    return student, s_params, teacher, t_params, batch


def test_no_gradient_reaches_the_teacher(pair):
    student, s_params, teacher, t_params, batch = pair
    kd = Distillation(teacher, alpha=0.8, temperature=2.0)

    def loss(t):
        options = train_lib.StepOptions(label_smoothing=0.1, distill=kd)
        step = jnp.zeros((), jnp.int32)
        total, _ = train_lib._loss_sums(
            s_params, batch, jax.random.key(2), step, t, model=student, options=options
        )
        return total

    grads = jax.grad(loss)(t_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))
    # The teacher does shape the loss: another teacher gives another value.
    other = jax.tree_util.tree_map(lambda x: x * 1.5, t_params)
    assert float(loss(t_params)) != float(loss(other))


def test_alpha_zero_is_exactly_the_plain_step(pair):
    student, s_params, teacher, t_params, batch = pair
    rng = jax.random.key(3)
    step = jnp.zeros((), jnp.int32)
    plain_options = train_lib.StepOptions(label_smoothing=0.1)
    plain = jax.jit(
        lambda p: train_lib._gradients(p, batch, rng, step, model=student, options=plain_options)
    )(s_params)
    kd = Distillation(teacher, alpha=0.0, temperature=2.0)
    options = train_lib.StepOptions(label_smoothing=0.1, distill=kd)
    distilled = jax.jit(
        lambda p, t: train_lib._gradients(p, batch, rng, step, t, model=student, options=options)
    )(s_params, t_params)
    assert float(plain[1]["loss"]) == float(distilled[1]["loss"])
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(plain[0]), leaves(distilled[0]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_student_trains_from_a_teacher_workdir(uninterrupted, corpus, tmp_path):
    """A narrower student restores the teacher, adopts its tokenizer and trains with KD."""
    command = train_command(
        tmp_path,
        corpus,
        f"--config.distill.teacher_workdir={uninterrupted}",
        "--config.distill.alpha=0.5",
        "--config.distill.temperature=2.0",
        "--config.model.d_model=16",
        "--config.model.d_ff=32",
        steps=12,
    )
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "spm.model").read_bytes() == (uninterrupted / "spm.model").read_bytes()
    losses = train_losses(tmp_path)
    assert len(losses) == 12 and all(np.isfinite(v) for v in losses.values())


def test_distill_data_writes_the_teachers_translations(uninterrupted, corpus, tmp_path):
    """Sequence-level data: train targets are the teacher's beam output, other splits kept."""
    out = tmp_path / "distilled"
    command = [sys.executable, "-m", "tfjax", "distill-data", f"--workdir={uninterrupted}"]
    command += [f"--output={out}", "--beam=2", "--batch=16"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("val", "test"):
        for lang in ("de", "en"):
            assert (out / f"{split}.{lang}").read_text() == (corpus / f"{split}.{lang}").read_text()
    sources = (out / "train.de").read_text().splitlines()
    targets = (out / "train.en").read_text().splitlines()
    assert len(sources) == len(targets) and 0 < len(sources) <= 400
    assert set(sources) <= set((corpus / "train.de").read_text().splitlines())
    translator = Translator.from_workdir(uninterrupted)
    expected = [t.text for t in translator.translate(sources[:8], beam_size=2, alpha=0.6)]
    assert targets[:8] == expected
