"""One of several local processes running 5 train steps on a shared 8-device CPU mesh.

  python tests/multi_process_steps.py PROCESS_ID NUM_PROCESSES PORT

Each process has 8 / NUM_PROCESSES CPU devices, joins JAX's multi-controller runtime on
localhost (gloo collectives) and feeds its own rows of each batch. Process 0 prints the
losses as JSON. With NUM_PROCESSES=1 it is the single-process reference.
"""

import json
import os
import sys

import jax
from multi_device_steps import batches

from tfjax import sharding, train_lib
from tfjax.model import Transformer, preset


def main(process_id: int, num_processes: int, port: int) -> None:
    # Before any device is touched: the backend starts with this many CPU devices.
    jax.config.update("jax_num_cpu_devices", 8 // num_processes)
    os.environ.update(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
    )
    if num_processes > 1:
        sharding.initialize_distributed()
    assert jax.device_count() == 8, jax.devices()
    model = Transformer(preset("tiny", d_model=64, num_heads=8, d_ff=128, dropout_rate=0.1))
    mesh = sharding.make_mesh((-1, 1, 1))
    optimizer = train_lib.make_optimizer(1e-3, 2, clip_norm=1.0)
    data = batches(5)
    rows = len(data[0]["inputs"]) // num_processes
    local = [
        {k: v[process_id * rows : (process_id + 1) * rows] for k, v in b.items()} for b in data
    ]
    state, shardings = train_lib.create_train_state(
        jax.random.key(0), model, optimizer, local[0], mesh
    )
    step = train_lib.jit_train_step(model, optimizer, shardings, mesh, label_smoothing=0.1)
    losses = []
    for batch in local:
        state, metrics = step(state, sharding.place_batch(batch, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"] / metrics["tokens"]))
    if process_id == 0:
        print(json.dumps({"losses": losses, "processes": jax.process_count()}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
