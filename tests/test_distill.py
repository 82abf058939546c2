"""Token-level knowledge distillation: the loss, the frozen teacher, and a distilled run."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_command, train_losses

from tfjax import checkpoint, distill, recipe, sharding, train_lib, trainer
from tfjax.data import load_or_train_tokenizer, train_dataset
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


def _first_step_inputs(workdir):
    """(student config, its first batch, its initial parameters) rebuilt as `tfjax.trainer`
    builds them for a fresh run in `workdir`: the recipe's pipeline over the prepared data with
    the workdir's tokenizer, and the train state initialised from config.seed."""
    config, data = recipe.workdir_data(str(workdir))
    tokenizer = load_or_train_tokenizer(
        workdir / "spm.model", data.source("train"), vocab_size=config.vocab_size
    )
    pipeline = train_dataset(data.source("train"), tokenizer, recipe.pipeline_options(config))
    batch = next(iter(pipeline))
    model = Transformer(recipe.model_config(config))
    optimizer, _ = recipe.train_step_options(config)
    state, _ = train_lib.create_train_state(
        jax.random.key(config.seed),
        model,
        optimizer,
        trainer._example_batch(config),
        sharding.make_mesh(tuple(config.mesh)),
    )
    return config, model, batch, state.params


def _smoothed_cross_entropy(logits, targets, label_smoothing):
    """[B, T]: -sum_v soft_v log p_v minus the entropy of soft, the smoothed target (mass
    1 - label_smoothing on the target, the rest spread over the other V - 1 tokens); the
    convention of `train_lib.token_scores`."""
    vocab = logits.shape[-1]
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    soft = np.where(np.arange(vocab) == targets[..., None], confidence, low)  # [B, T, V]
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low))
    return -np.sum(soft * _np_log_softmax(logits), axis=-1) - entropy


def test_a_student_trains_from_a_teacher_workdir(uninterrupted, corpus, tmp_path):
    """A narrower student restores the teacher, adopts its tokenizer and trains on the KD loss.

    Its first logged loss (step 1; the test recipe logs every step) is the distillation
    formula of `tfjax.distill` on its first batch, computed here in NumPy from the logits of
    the student's initial parameters and of the teacher's restored ones. No dropout, so the
    step's logits are those of a plain forward pass.
    """
    alpha, temperature = 0.5, 2.0
    command = train_command(
        tmp_path,
        corpus,
        f"--config.distill.teacher_workdir={uninterrupted}",
        f"--config.distill.alpha={alpha}",
        f"--config.distill.temperature={temperature}",
        "--config.model.d_model=16",
        "--config.model.d_ff=32",
        "--config.model.dropout_rate=0",
        "--config.eval_decode_sentences=0",  # losses only: no decoder to compile
        "--config.test_split=",
        steps=12,
    )
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "spm.model").read_bytes() == (uninterrupted / "spm.model").read_bytes()
    losses = train_losses(tmp_path)
    assert len(losses) == 12 and all(np.isfinite(v) for v in losses.values())

    config, student, batch, params = _first_step_inputs(tmp_path)
    teacher_cfg, teacher_params, _, _ = checkpoint.restore_for_inference(uninterrupted)
    inputs = train_lib.model_inputs(batch)
    logits = np.asarray(student.apply({"params": params}, **inputs), np.float64)  # [B, T, V]
    teacher = np.asarray(Transformer(teacher_cfg).apply({"params": teacher_params}, **inputs))
    targets = np.asarray(batch["targets"])
    weights = (targets != student.config.pad_id).astype(np.float64)  # [B, T]
    ce = _smoothed_cross_entropy(logits, targets, config.label_smoothing)
    p_teacher = _np_log_softmax(teacher.astype(np.float64) / temperature)
    p_student = _np_log_softmax(logits / temperature)
    kl = np.sum(np.exp(p_teacher) * (p_teacher - p_student), axis=-1)  # [B, T]
    per_token = alpha * temperature**2 * kl + (1 - alpha) * ce
    expected = np.sum(per_token * weights) / np.sum(weights)
    # The step computes in float32 and this in float64: they differed by 5e-8 relative.
    assert losses[1] == pytest.approx(expected, rel=1e-6)
    # The teacher's term matters: the cross-entropy alone is far from the logged loss.
    assert np.sum(ce * weights) / np.sum(weights) != pytest.approx(expected, rel=1e-2)


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


class _Interrupted:
    """A teacher whose translation stream stops with Ctrl-C after `after` sentences (None:
    never); records how many sources each call asked for."""

    def __init__(self, translator: Translator, after: int | None) -> None:
        self.translator, self.after, self.asked = translator, after, []

    def __getattr__(self, name):
        return getattr(self.translator, name)

    def translate_stream(self, sources, **kwargs):
        self.asked.append(len(sources))
        for i, t in enumerate(self.translator.translate_stream(sources, **kwargs)):
            if i == self.after:
                raise KeyboardInterrupt
            yield t


def test_distill_data_resumes_after_an_interruption(uninterrupted, tmp_path):
    """Ctrl-C mid-train loses nothing translated: the rerun asks the teacher only for the
    rest, drops a line the interruption cut, and writes what one uninterrupted run writes."""
    train, data = recipe.workdir_data(str(uninterrupted))
    langs = (train.source_lang, train.target_lang)
    # Batches of 16 and a stop at 32: the resumed batches are the uninterrupted run's own, so
    # even ties decide alike.
    translator = Translator.from_workdir(uninterrupted, max_batch=16)
    write = lambda teacher, out: distill.write_distillation_data(  # noqa: E731
        teacher, data, langs, str(out), beam_size=1, alpha=0.6
    )
    whole = write(translator, tmp_path / "whole")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write(_Interrupted(translator, after=32), out)
    assert not (out / "train.en").exists()  # train is written last, and whole
    partial = out / distill.PARTIAL
    assert len(partial.read_text().splitlines()) == 1 + 32
    with partial.open("a") as f:
        f.write('"a line cut sho')
    teacher = _Interrupted(translator, after=None)
    write(teacher, out)
    sources = len((whole / "train.de").read_text().splitlines())
    assert teacher.asked == [data.split_sizes["train"] - 32] and sources > 32
    for name in sorted(p.name for p in whole.iterdir()):
        assert (out / name).read_text() == (whole / name).read_text(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())


def test_distill_data_starts_over_on_another_teachers_partial(uninterrupted, tmp_path):
    train, data = recipe.workdir_data(str(uninterrupted))
    translator = _Interrupted(Translator.from_workdir(uninterrupted, max_batch=16), None)
    (tmp_path / distill.PARTIAL).write_text('{"teacher": "another"}\n"a translation"\n')
    distill.write_distillation_data(
        translator, data, (train.source_lang, train.target_lang), str(tmp_path), beam_size=1,
        alpha=0.6,
    )  # fmt: skip
    assert translator.asked == [data.split_sizes["train"]]
    assert "a translation" not in (tmp_path / "train.en").read_text()
