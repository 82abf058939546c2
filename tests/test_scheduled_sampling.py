"""Scheduled sampling: the decay schedules, the input mixing, and its place in the train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import with_decoder_inputs

from tfjax import scheduled_sampling, train_lib
from tfjax.model import Transformer, preset
from tfjax.scheduled_sampling import ScheduledSampling

BOS = 2


def _packed_batch(rng, rows=4, src_len=12, tgt_len=12, vocab=64):
    """Two pairs per row where they fit, then padding: the pipeline's packed contract."""
    batch = {k: np.zeros((rows, n), np.int32) for k, n in (("inputs", src_len),)}
    targets = np.zeros((rows, tgt_len), np.int32)
    segments = np.zeros((rows, tgt_len), np.int32)
    positions = np.zeros((rows, tgt_len), np.int32)
    src_segments = np.zeros((rows, src_len), np.int32)
    src_positions = np.zeros((rows, src_len), np.int32)
    for r in range(rows):
        t = s = 0
        for seg in (1, 2):
            n, m = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            targets[r, t : t + n] = rng.integers(4, vocab, n)
            segments[r, t : t + n], positions[r, t : t + n] = seg, np.arange(n)
            batch["inputs"][r, s : s + m] = rng.integers(4, vocab, m)
            src_segments[r, s : s + m], src_positions[r, s : s + m] = seg, np.arange(m)
            t, s = t + n, s + m
    batch.update(
        targets=targets,
        targets_segment_ids=segments,
        targets_positions=positions,
        inputs_segment_ids=src_segments,
        inputs_positions=src_positions,
    )
    return with_decoder_inputs(batch)


def test_schedules_follow_bengio_et_al():
    steps = np.array([0, 10, 100, 500, 2000])
    linear = ScheduledSampling("linear", k=1.0, c=1e-3, min_truth=0.1)
    np.testing.assert_allclose(
        [float(linear.truth_probability(i)) for i in steps], np.maximum(0.1, 1 - 1e-3 * steps)
    )
    exponential = ScheduledSampling("exponential", k=0.99)
    np.testing.assert_allclose(
        [float(exponential.truth_probability(i)) for i in steps], 0.99**steps, rtol=1e-4
    )
    sigmoid = ScheduledSampling("inverse_sigmoid", k=50.0)
    expected = 50.0 / (50.0 + np.exp(steps / 50.0))
    np.testing.assert_allclose(
        [float(sigmoid.truth_probability(i)) for i in steps], expected, rtol=1e-4
    )
    assert float(sigmoid.probability(2000)) == pytest.approx(1 - expected[-1])


@pytest.mark.parametrize("args", [("cosine", 1.0), ("exponential", 1.5), ("inverse_sigmoid", 0.5)])
def test_bad_schedules_are_refused(args):
    with pytest.raises(ValueError):
        ScheduledSampling(*args)


def test_replaceable_is_where_the_pipeline_shifted_a_target():
    batch = _packed_batch(np.random.default_rng(0))
    allowed = np.asarray(
        scheduled_sampling.replaceable(batch["targets"], batch["targets_segment_ids"])
    )
    shifted_target = (batch["decoder_inputs"] != BOS) & (batch["decoder_inputs"] != 0)
    np.testing.assert_array_equal(allowed, shifted_target)
    unpacked = np.array([[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(
        scheduled_sampling.replaceable(jnp.asarray(unpacked)),
        [[False, True, True, False], [False, False, False, False]],
    )


def test_mixing_rate_matches_p():
    shape = (256, 64)
    allowed = np.random.default_rng(0).random(shape) < 0.8
    allowed[:, 0] = False  # a row's first position always starts a segment
    allowed = jnp.asarray(allowed)
    gold, predicted = jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32)
    for p in (0.1, 0.5, 0.9):
        mixed, replaced = scheduled_sampling.mix(gold, predicted, allowed, p, jax.random.key(3))
        assert not np.any(np.asarray(replaced) & ~np.asarray(allowed))
        rate = float(jnp.sum(replaced)) / float(jnp.sum(allowed))
        assert abs(rate - p) < 0.01, (p, rate)  # 13k Bernoulli draws: std < 0.005
        np.testing.assert_array_equal(mixed, replaced.astype(jnp.int32))


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(preset("tiny"))
    batch = _packed_batch(np.random.default_rng(1))
    params = model.init(jax.random.key(0), **train_lib.model_inputs(batch))["params"]
    return model, params, batch


def _first_pass_inputs(model, params, batch):
    """The documented p = 1 rule, in NumPy: after a segment's first position, every decoder
    input is the teacher-forced pass's argmax prediction of the previous position."""
    logits = model.apply({"params": params}, **train_lib.model_inputs(batch))
    predictions = np.argmax(np.asarray(logits), axis=-1)  # [B, T]
    expected = np.array(batch["decoder_inputs"])
    segments = batch["targets_segment_ids"]
    for b, t in np.ndindex(expected.shape):
        if t > 0 and segments[b, t] > 0 and segments[b, t] == segments[b, t - 1]:
            expected[b, t] = predictions[b, t - 1]
    return expected


def test_p_one_feeds_the_first_pass_predictions_shifted_right(tiny):
    model, params, batch = tiny
    always = ScheduledSampling("linear", k=0.0)  # epsilon 0: p = 1
    inputs = train_lib._sampled_inputs(params, batch, jax.random.key(5), model, always, 0)
    expected = _first_pass_inputs(model, params, batch)
    np.testing.assert_array_equal(inputs["decoder_inputs"], expected)


def test_p_zero_is_exactly_teacher_forcing(tiny):
    model, params, batch = tiny
    never = ScheduledSampling("linear", k=1.0)  # epsilon 1: p = 0
    rng = jax.random.key(7)

    def gradients(sampling):
        options = train_lib.StepOptions(label_smoothing=0.1, sampling=sampling)
        step = jnp.asarray(3, jnp.int32)
        fn = lambda p: train_lib._gradients(p, batch, rng, step, model=model, options=options)  # noqa: E731
        return jax.jit(fn)(params)

    (g_plain, m_plain), (g_never, m_never) = gradients(None), gradients(never)
    assert float(m_plain["loss"]) == float(m_never["loss"])
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(g_plain), leaves(g_never), strict=True):
        np.testing.assert_array_equal(a, b)


_OPTIMIZER = optax.adam(1e-3)  # the loss metric is taken before the update: any optimizer


@functools.cache  # one compilation per sampling setting, whatever the state's step
def _train_step(model, sampling):
    options = train_lib.StepOptions(label_smoothing=0.1, sampling=sampling)
    step = functools.partial(
        train_lib.train_step, model=model, optimizer=_OPTIMIZER, options=options
    )
    return jax.jit(step)


def _step_loss(model, params, batch, step, sampling):
    """The loss metric of one jitted `train_lib.train_step` from a state at `step`."""
    state = train_lib.TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=_OPTIMIZER.init(params)
    )
    _, metrics = _train_step(model, sampling)(state, batch, jax.random.key(11))
    return float(metrics["loss"])


@pytest.fixture(scope="module")
def reference_losses(tiny):
    """Plain train-step losses (no scheduled sampling) on the gold decoder inputs and on the
    first pass's predictions mixed in by the documented rule. The tiny preset has no dropout,
    so a step's loss depends on its inputs only."""
    model, params, batch = tiny
    fed = dict(batch, decoder_inputs=_first_pass_inputs(model, params, batch))
    assert np.any(fed["decoder_inputs"] != batch["decoder_inputs"])  # an untrained model errs
    gold, predicted = (_step_loss(model, params, b, 0, None) for b in (batch, fed))
    assert abs(gold - predicted) > 1e-3 * abs(gold)  # the two cases are told apart
    return gold, predicted


# epsilon = 1 - step / 4: p = 0 from a state at step 0, p = 1 from step 4 on (exactly: 0.25 * 4
# is 1 in float32, and a Bernoulli draw with p = 1 always replaces).
RAMP = ScheduledSampling("linear", k=1.0, c=0.25)


@pytest.mark.parametrize("step, fed", [(0, "gold"), (4, "first pass"), (9, "first pass")])
def test_train_step_takes_its_loss_where_the_schedule_at_the_states_step_says(
    tiny, reference_losses, step, fed
):
    """One jitted train step, the same parameters, states at different steps: at p = 0 the
    loss is the plain step's on the gold inputs, at p = 1 the plain step's on the first pass's
    predictions (`_first_pass_inputs`)."""
    model, params, batch = tiny
    gold, predicted = reference_losses
    expected = gold if fed == "gold" else predicted
    # Equal here; the bound allows XLA to fuse the two programs' sums differently.
    assert _step_loss(model, params, batch, step, RAMP) == pytest.approx(expected, rel=1e-6)
