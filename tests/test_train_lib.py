"""Losses, schedule, accumulation and sharded train steps of tfjax.train_lib."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, local_processes, multi_device_run
from multi_device_steps import STEPS

from tfjax import sharding, train_lib
from tfjax.model import Transformer, preset


def _np_smoothed_ce(logits, targets, weights, ls):
    """Cross-entropy against the smoothed one-hot, minus that target's entropy, in NumPy."""
    vocab = logits.shape[-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    total = 0.0
    for b, t in np.ndindex(targets.shape):
        q = np.full(vocab, ls / (vocab - 1))
        q[targets[b, t]] = 1 - ls
        ce = -(q * logp[b, t]).sum()
        entropy = -(q * np.log(np.where(q > 0, q, 1))).sum()
        total += weights[b, t] * (ce - entropy)
    return total


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_matches_numpy(ls):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    loss, tokens = train_lib.cross_entropy(jnp.asarray(logits), targets, weights, ls)
    assert float(tokens) == weights.sum()
    assert float(loss) == pytest.approx(_np_smoothed_ce(logits, targets, weights, ls), rel=1e-5)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_token_scores_values_and_gradient_against_autodiff(ls):
    """nll and hits against NumPy; the written-out gradient against autodiff of the textbook
    loss (log-softmax dotted with the explicit smoothed one-hot)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 4))
    a, b = rng.normal(size=(2, 3, 4)).astype(np.float32)  # cotangents of loss and nll

    loss, nll, hit = train_lib.token_scores(jnp.asarray(logits), targets, ls)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(nll, -np.take_along_axis(logp, targets[..., None], -1)[..., 0], 1e-5)
    np.testing.assert_array_equal(hit, (logits.argmax(-1) == targets).astype(np.float32))

    def textbook(x):
        soft = jax.nn.one_hot(targets, 11) * (1 - ls - ls / 10) + ls / 10
        logp = jax.nn.log_softmax(x)
        nll = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(a * -(soft * logp).sum(-1)) + jnp.sum(b * nll)

    def ours(x):
        loss, nll, _ = train_lib.token_scores(x, targets, ls)
        return jnp.sum(a * loss) + jnp.sum(b * nll)

    expected = jax.grad(textbook)(jnp.asarray(logits))
    np.testing.assert_allclose(jax.grad(ours)(jnp.asarray(logits)), expected, atol=1e-6)


def test_perfect_prediction_of_smoothed_target_has_zero_loss():
    q = np.full((1, 1, 5), 0.1 / 4)
    q[0, 0, 2] = 0.9
    loss, _ = train_lib.cross_entropy(
        jnp.log(jnp.asarray(q)), jnp.array([[2]]), jnp.ones((1, 1)), 0.1
    )
    assert abs(float(loss)) < 1e-6


def test_rsqrt_schedule():
    lr = train_lib.rsqrt_schedule(1e-3, warmup_steps=100)
    # optax counts from 0: update n (1-based) uses count n - 1.
    assert float(lr(0)) == pytest.approx(1e-5)
    assert float(lr(99)) == pytest.approx(1e-3)
    assert float(lr(399)) == pytest.approx(1e-3 * 0.5)


def _batch(rng, rows=8, src_len=7, tgt_len=6, vocab=64):
    """Random pairs in the data pipeline's contract, with some padding."""
    inputs = rng.integers(4, vocab, size=(rows, src_len))
    targets = rng.integers(4, vocab, size=(rows, tgt_len))
    for r in range(rows):
        inputs[r, rng.integers(3, src_len + 1) :] = 0
        targets[r, rng.integers(2, tgt_len + 1) :] = 0
    decoder_inputs = np.concatenate([np.full((rows, 1), 2), targets[:, :-1]], axis=1)
    decoder_inputs[targets == 0] = 0
    cast = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return dict(inputs=cast(inputs), targets=cast(targets), decoder_inputs=cast(decoder_inputs))


def test_accumulation_equals_the_full_batch_gradient():
    model = Transformer(preset("tiny"))
    batch = _batch(np.random.default_rng(1))
    optimizer = train_lib.make_optimizer(train_lib.rsqrt_schedule(1e-3, 10))
    mesh = sharding.make_mesh()
    state, _ = train_lib.create_train_state(jax.random.key(0), model, optimizer, batch, mesh)

    def gradients(accum: int):
        options = train_lib.StepOptions(label_smoothing=0.1, accum_steps=accum)
        fn = functools.partial(train_lib._gradients, model=model, options=options)
        return jax.jit(fn)(state.params, batch, jax.random.key(1), state.step)

    grads = {accum: gradients(accum) for accum in (1, 4)}
    (g1, m1), (g4, m4) = grads[1], grads[4]
    assert float(m1["tokens"]) == float(m4["tokens"]) == float((batch["targets"] > 0).sum())
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g1, g4)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_reduces_the_loss(dtype):
    model = Transformer(preset("tiny", dtype=dtype))  # parameters stay float32 either way
    rng = np.random.default_rng(2)
    batch = _batch(rng)
    optimizer = train_lib.make_optimizer(train_lib.rsqrt_schedule(3e-3, 5), clip_norm=1.0)
    mesh = sharding.make_mesh()
    state, shardings = train_lib.create_train_state(
        jax.random.key(0), model, optimizer, batch, mesh
    )
    options = train_lib.StepOptions(label_smoothing=0.0)
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, options)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(3))
        losses.append(float(metrics["loss"] / metrics["tokens"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad in [(3, -1, 1), (-1, -1, 1), (2, 2, 1), (0, 1, 1), (8, 1)]:
        with pytest.raises(ValueError, match="mesh sizes"):
            sharding.mesh_shape(bad, 8)


@pytest.fixture(scope="module")
def eight_devices() -> dict[str, dict]:
    """tests/multi_device_steps.py's result per mesh ("1,1,1", "8,1,1", ...), on 8 CPU
    devices in one process."""
    process = multi_device_run()  # started when the suite was collected
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_meshes_of_eight_devices_match_one_device(eight_devices):
    """5 steps on data (8,1,1), fsdp (1,8,1) and mixed (2,2,2) meshes equal one device.

    The bounds are ratios to the one-device run's own scale (see `errors` in the script), not
    absolute: float32 regrouping of the batch sums measured ~5e-7 of the gradient scale and
    ~0.3% of each leaf's total change over 5 Adam steps, with AVX2 and AVX-512 kernels alike.
    1e-5 for gradients and losses is ~ the worst case of regrouping a float32 sum of the
    batch's 128 target tokens (128 * 2^-24 = 7.6e-6); 5% for the later parameters leaves 15x
    over that rounding. A batch shard read by every device, or gradients not all-reduced,
    measured gradient errors of 1.5-3.5 and parameter errors near 2 (a different update).
    """
    result = dict(eight_devices)
    reference = result.pop("1,1,1")
    for mesh, run in result.items():
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5, err_msg=mesh)
        assert run["grad_error"] < 1e-5, (mesh, run)
        assert run["param_error"] < 0.05, (mesh, run)
        # Key biases have a zero true gradient: Adam's steps on them are rounding noise.
        assert run["key_bias_change"] <= STEPS, (mesh, run)
        if mesh != "8,1,1":  # fsdp and tensor axes really split the parameters
            assert run["sharded_leaves"] > 0, mesh


def test_two_processes_match_one_process(eight_devices):
    """jax.distributed on localhost, 4 CPU devices per process, gloo collectives: the same
    steps as the 8-device run's data-parallel mesh, which is one process of 8 devices."""
    two = local_processes(ROOT / "tests" / "multi_process_steps.py", alone=False)
    assert two[0]["processes"] == two[1]["processes"] == 2
    for process in two:
        np.testing.assert_allclose(process["losses"], eight_devices["8,1,1"]["losses"], rtol=1e-6)
