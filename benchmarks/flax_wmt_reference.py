"""google/flax's examples/wmt train step, imported at run time from a copy of the example.

Nothing of the example is copied into this project: `load` imports its train.py (and through
it models.py) from the directory given, and its configs/default.py for the hyperparameters.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Step = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[Any, dict[str, jax.Array]]]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    """An empty module named `name` holding `attrs`."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def load(directory: str) -> tuple[types.ModuleType, Any]:
    """(the example's train module, its default config), imported from `directory`."""
    path = Path(directory).resolve()
    # flax.io (imported by train.py's flax.training.checkpoints) asks importlib whether
    # TensorFlow is installed, which a stub cannot answer: let it look before the stubs exist.
    importlib.import_module("flax.training.checkpoints")
    # train.py imports TensorFlow and clu at module level for its input pipeline, checkpoints
    # and logging, none of which train_step touches; `tf.data.Dataset` is only read by an
    # annotation. Stubs keep both off this machine (and TensorFlow's threads out of the timing).
    clu = _module(
        "clu",
        metric_writers=_module("clu.metric_writers"),
        periodic_actions=_module("clu.periodic_actions"),
    )
    stubs = [
        _module("tensorflow", data=_module("tensorflow.data", Dataset=object)),
        clu,
        clu.metric_writers,
        clu.periodic_actions,
        _module("input_pipeline"),  # imports tensorflow_datasets and clu.deterministic_data
    ]
    for stub in stubs:
        sys.modules.setdefault(stub.__name__, stub)
    sys.path.insert(0, str(path))
    train = importlib.import_module("train")
    spec = importlib.util.spec_from_file_location("wmt_default_config", path / "configs/default.py")
    defaults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defaults)
    return train, defaults.get_config()


def describe(directory: str) -> str:
    """'flax examples/wmt at <short commit>', or, outside git, a phrase without the directory
    (a path of one machine says nothing in a shared results file)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "flax examples/wmt outside git (its commit not recorded)"
    return f"flax examples/wmt at {commit}"


def setup(
    train: types.ModuleType, defaults: Any, cfg: Any, batch: dict[str, jax.Array]
) -> tuple[Any, Step, dict[str, jax.Array], jax.Array]:
    """(state, jitted step, placed batch, dropout key) of the example at tfjax's `cfg` sizes.

    Built as train.py's `train_and_evaluate` builds them, in fp32; `batch` is tfjax's, whose
    "inputs" and "targets" the example reads (it shifts the targets right itself).
    """
    config = train.models.TransformerConfig(
        vocab_size=cfg.vocab_size,
        output_vocab_size=cfg.vocab_size,
        share_embeddings=True,
        logits_via_embedding=True,
        dtype=jnp.float32,
        emb_dim=cfg.d_model,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        qkv_dim=cfg.d_model,
        mlp_dim=cfg.d_ff,
        max_len=cfg.max_len,
        dropout_rate=cfg.dropout_rate,
        attention_dropout_rate=cfg.attention_dropout_rate,
        deterministic=False,
        decode=False,
    )
    rng, init_rng = jax.random.split(jax.random.key(defaults.seed))
    model = train.models.Transformer(config.replace(deterministic=True))
    inputs, targets = batch["inputs"], batch["targets"]
    variables = jax.jit(model.init)(
        init_rng, jnp.ones(inputs.shape, jnp.float32), jnp.ones(targets.shape, jnp.float32)
    )
    schedule = train.create_learning_rate_schedule(
        learning_rate=defaults.learning_rate, warmup_steps=defaults.warmup_steps
    )
    tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=defaults.weight_decay)
    state = train.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, dynamic_scale=None
    )
    step = functools.partial(
        train.train_step,
        config=config,
        learning_rate_fn=schedule,
        label_smoothing=defaults.label_smoothing,
    )
    # train_step's pmean and psum name the axis "batch" that train.py's pmap binds; a
    # one-device shard_map binds it under jit. Without check_vma, which would add a psum per
    # parameter's gradient, the compiled step has pmap's collectives: one combined all-reduce.
    mesh = Mesh(jax.devices()[:1], ("batch",))
    specs = (PartitionSpec(), PartitionSpec("batch"), PartitionSpec())
    mapped = jax.shard_map(
        lambda state, batch, rng: step(state, batch, dropout_rng=rng),
        mesh=mesh,
        in_specs=specs,
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    placed = jax.device_put(
        dict(inputs=inputs, targets=targets), NamedSharding(mesh, PartitionSpec("batch"))
    )
    return state, jax.jit(mapped, donate_argnums=0), placed, rng
