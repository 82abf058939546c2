"""Run 5 train steps on several meshes of simulated CPU devices; print losses as JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train_lib.py does).
"""

import json

import jax
import numpy as np

from tfjax import sharding, train_lib
from tfjax.model import Transformer, preset

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]
STEPS = 5
PEAK_LR = 1e-3


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


def train(mesh, data: list[dict[str, np.ndarray]]) -> tuple[list[float], train_lib.TrainState]:
    """Losses of len(data) steps on `mesh`; `data` holds this process's rows of each batch."""
    # d_model 64 and 8 heads, so fsdp and tensor axes of 8 split every dimension they name.
    model = Transformer(preset("tiny", d_model=64, num_heads=8, d_ff=128, dropout_rate=0.1))
    optimizer = train_lib.make_optimizer(train_lib.rsqrt_schedule(PEAK_LR, 2), clip_norm=1.0)
    state, shardings = train_lib.create_train_state(
        jax.random.key(0), model, optimizer, data[0], mesh
    )
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, label_smoothing=0.1)
    losses = []
    for batch in data:
        state, metrics = step(state, sharding.place_batch(batch, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"] / metrics["tokens"]))
    return losses, state


def run(mesh_sizes: tuple[int, int, int], data: list[dict[str, np.ndarray]]):
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(mesh_sizes))])
    losses, state = train(mesh, data)
    split = sum(
        not leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(state.params)
    )
    return losses, jax.device_get(state.params), split


def max_diffs(params, reference) -> tuple[float, float]:
    """Max |difference| over all parameters but the attention key biases, and over those.

    A key bias adds the same q.b to every score of a query, which softmax ignores: its true
    gradient is 0, and Adam (eps 1e-9) turns the ~1e-9 rounding noise left in it into steps
    of up to the learning rate in either direction. Those are compared against steps * lr.
    """
    diffs = jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params, reference)
    )[0]
    is_key_bias = lambda path: "'key']['bias'" in jax.tree_util.keystr(path)  # noqa: E731
    others = [d for path, d in diffs if not is_key_bias(path)]
    key_biases = [d for path, d in diffs if is_key_bias(path)]
    return max(others), max(key_biases, default=0.0)


def main() -> None:
    data = batches(STEPS)
    result, reference = {}, None
    for sizes in MESHES:
        losses, params, split = run(sizes, data)
        reference = params if reference is None else reference
        param_diff, key_bias_diff = max_diffs(params, reference)
        result[",".join(map(str, sizes))] = dict(
            losses=losses,
            param_diff=param_diff,
            key_bias_diff=key_bias_diff,
            sharded_leaves=split,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
