"""Train 5 steps on several meshes of simulated CPU devices; print what differs from one device.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train_lib.py does).
Prints one JSON line: per mesh, the losses and three error ratios, each per leaf and relative
to a scale of the one-device run (see `errors`).
"""

import functools
import json
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from tfjax import sharding, train_lib
from tfjax.model import Transformer, preset

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]
STEPS = 5
PEAK_LR = 1e-3
LABEL_SMOOTHING = 0.1


def batches(steps: int, rows: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        inputs = rng.integers(4, 64, size=(rows, 8)).astype(np.int32)
        targets = rng.integers(4, 64, size=(rows, 8)).astype(np.int32)
        inputs[:, 6:] = 0
        targets[::2, 5:] = 0
        decoder_inputs = np.concatenate([np.full((rows, 1), 2, np.int32), targets[:, :-1]], 1)
        out.append(dict(inputs=inputs, targets=targets, decoder_inputs=decoder_inputs))
    return out


def _model() -> Transformer:
    # d_model 64 and 8 heads, so fsdp and tensor axes of 8 split every dimension they name;
    # one layer each side holds every kind of leaf, and compiles in half the time of two.
    config = preset("tiny", d_model=64, num_heads=8, d_ff=128, dropout_rate=0.1, num_layers=1)
    return Transformer(config)


def train(mesh, data: list[dict[str, np.ndarray]]) -> tuple[list[float], Any, Any, Any]:
    """(losses of len(data) steps, the final state, its initial parameters, the first step's
    gradients); `data` holds this process's rows of each batch.

    The gradients are those the first train step takes (same function, rng and shardings),
    computed on their own to be compared before Adam, which divides each by its own running
    magnitude and so amplifies rounding.
    """
    model = _model()
    optimizer = train_lib.make_optimizer(train_lib.rsqrt_schedule(PEAK_LR, 2), clip_norm=1.0)
    options = train_lib.StepOptions(label_smoothing=LABEL_SMOOTHING)
    state, shardings = train_lib.create_train_state(
        jax.random.key(0), model, optimizer, data[0], mesh
    )
    rng = jax.random.key(1)
    gradients = functools.partial(train_lib._gradients, model=model, options=options)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
        first = sharding.place_batch(data[0], mesh)
        # The step's rng is fold_in(rng, step), at step 0.
        grads, _ = jax.jit(gradients)(state.params, first, jax.random.fold_in(rng, 0), state.step)
    initial = jax.tree.map(lambda x: x.copy(), state.params)  # the step donates the state
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, options)
    losses = []
    for batch in data:
        state, metrics = step(state, sharding.place_batch(batch, mesh), rng)
        losses.append(float(metrics["loss"] / metrics["tokens"]))
    return losses, state, initial, grads


def _max_abs(tree) -> list[tuple[str, float]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), float(np.abs(x).max())) for p, x in leaves]


def errors(run: dict, reference: dict) -> dict[str, float]:
    """Largest per-leaf errors of `run` against the one-device `reference`, as ratios.

    grad_error: |g - g_ref| / max |g_ref| over all parameters: a gradient is a sum over the
      batch's tokens, and a mesh only regroups that sum (partial sums per shard, then an
      all-reduce), so it may differ by float32 rounding of the sum, a few 1e-7 of its scale.
    param_error: |p - p_ref| after all steps, over max |p_ref - p_initial| of the same leaf:
      Adam divides each gradient by its own running magnitude, which can turn rounding noise in
      a near-zero gradient into a step of its own, so later parameters are compared loosely.
    key_bias_change: the attention key biases, |p - p_ref| in units of the learning rate. A
      key bias adds the same q.b to every score of a query, which softmax ignores: its true
      gradient is 0, and Adam (eps 1e-9) turns the ~1e-9 rounding left in it into steps of up
      to the learning rate in either direction, however the mesh is laid out.
    """
    g_scale = max(v for _, v in _max_abs(reference["grads"]))
    g_diff = jax.tree_util.tree_map(lambda a, b: a - b, run["grads"], reference["grads"])
    moved = jax.tree_util.tree_map(lambda a, b: a - b, reference["final"], reference["initial"])
    p_diff = jax.tree_util.tree_map(lambda a, b: a - b, run["final"], reference["final"])
    grad_error = max(v for _, v in _max_abs(g_diff)) / g_scale
    param_error, key_bias_change = 0.0, 0.0
    leaves = zip(_max_abs(p_diff), _max_abs(moved), strict=True)
    for (path, diff), (_, change) in leaves:
        if "'key']['bias'" in path:
            key_bias_change = max(key_bias_change, diff / PEAK_LR)
        else:
            param_error = max(param_error, diff / change)
    return dict(grad_error=grad_error, param_error=param_error, key_bias_change=key_bias_change)


def main() -> None:
    data = batches(STEPS)
    result, reference = {}, None
    for sizes in MESHES:
        mesh = sharding.make_mesh(sizes, jax.devices()[: int(np.prod(sizes))])
        losses, state, initial, grads = train(mesh, data)
        split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
        run = jax.device_get(dict(grads=grads, initial=initial, final=state.params))
        reference = run if reference is None else reference
        result[",".join(map(str, sizes))] = dict(
            losses=losses, sharded_leaves=split, **errors(run, reference)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
