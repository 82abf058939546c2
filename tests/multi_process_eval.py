"""One of several local processes evaluating a trained workdir's validation split on a shared
8-device CPU mesh; every process prints its scores as JSON.

  python tests/multi_process_eval.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

As in the trainer: each process reads its own rows of every eval batch, the rows are placed
on the mesh and the parameters replicated over it. With NUM_PROCESSES=1 it is the
single-process reference.
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from multi_process_steps import join

from tfjax import checkpoint, evaluate, recipe, sharding
from tfjax.data import Tokenizer
from tfjax.model import Transformer


def replicated(tree, mesh):
    """Host arrays -> global arrays replicated over `mesh` (every process passes the same)."""
    spec = NamedSharding(mesh, PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    join(process_id, num_processes, port)
    config, data = recipe.workdir_data(workdir)
    model_cfg, params, tokenizer_bytes, _ = checkpoint.restore_for_inference(workdir)
    mesh = sharding.make_mesh((-1, 1, 1))
    params = replicated(jax.device_get(params), mesh)
    results = {}
    for beam in (1, 2):
        options = recipe.eval_options(config)
        options = evaluate.EvalOptions(**{**vars(options), "beam_size": beam})
        results[f"beam{beam}"] = evaluate.evaluate_split(
            Transformer(model_cfg),
            params,
            Tokenizer(tokenizer_bytes),
            data.source(config.eval_split),
            options,
            mesh=mesh,
        )
    print(json.dumps({"process": jax.process_index(), **results}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), sys.argv[4])
