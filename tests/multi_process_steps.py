"""One of several local processes running 5 train steps on a shared 8-device CPU mesh.

  python tests/multi_process_steps.py PROCESS_ID NUM_PROCESSES PORT

Each process has 8 / NUM_PROCESSES CPU devices, joins JAX's multi-controller runtime on
localhost (gloo collectives) and feeds its own rows of each batch. Process 0 prints the
losses as JSON (every process the same). With NUM_PROCESSES=1 it is the single-process reference.
"""

import json
import os
import sys

import jax
from multi_device_steps import STEPS, batches, train

from tfjax import sharding


def join(process_id: int, num_processes: int, port: int) -> None:
    """Become process `process_id` of a job of 8 CPU devices on localhost (alone if 1)."""
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


def main(process_id: int, num_processes: int, port: int) -> None:
    join(process_id, num_processes, port)
    data = batches(STEPS)
    rows = len(data[0]["inputs"]) // num_processes
    local = [
        {k: v[process_id * rows : (process_id + 1) * rows] for k, v in b.items()} for b in data
    ]
    losses = train(sharding.make_mesh((-1, 1, 1)), local)[0]
    print(json.dumps({"losses": losses, "processes": jax.process_count()}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
