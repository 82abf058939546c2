"""Ahead-of-time compiles for device topologies: memory accounts, errors, TPU targets."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env_with_xla_flag

from configs import default
from tfjax import precompile
from tfjax.model import Transformer
from tfjax.recipe import model_config

S, T = 16, 12  # source and target lengths of the tiny recipe


def tiny_config(**overrides):
    """The default recipe shrunk until a compile takes about a second."""
    config = default.get_config()
    config.vocab_size = 96
    config.max_source_len, config.max_target_len = S, T
    config.batch_size, config.eval_batch_size, config.eval_beam_size = 8, 4, 2
    config.model.update(d_model=32, d_ff=64, num_heads=2, num_layers=1, max_len=32)
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def one_device():
    return precompile.get_target("cpu:1")


@pytest.fixture(scope="module")
def reports(one_device):
    """Train-step reports of the tiny recipe on one device, by batch rows."""
    out = {}
    for rows in (4, 8, 16):
        config = tiny_config(batch_size=rows)
        mesh = precompile.mesh_for(config, one_device)
        model = Transformer(model_config(config))
        out[rows] = precompile.compile_train_step(config, model, mesh)[0]
    return out


def test_train_step_memory_follows_the_batch(reports):
    """Arguments grow by exactly the batch's bytes; the rest is the state, from a param count."""
    row_bytes = 4 * (3 * S + 4 * T)  # int32: inputs + 2 segment arrays; targets, decoder inputs + 2
    for r in (8, 16):
        assert reports[r].argument_bytes - reports[4].argument_bytes == (r - 4) * row_bytes
    config = tiny_config()
    params = jax.eval_shape(
        Transformer(model_config(config)).init,
        jax.random.key(0),
        np.zeros((1, S), np.int32),
        np.zeros((1, T), np.int32),
    )["params"]
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    state = reports[4].argument_bytes - 4 * row_bytes  # params, Adam's mu and nu, step, rng
    assert 12 * count <= state <= 12 * count + 64
    assert 12 * count <= reports[4].alias_bytes < state  # the donated state, not the rng
    temps = [reports[r].temp_bytes for r in (4, 8, 16)]
    assert temps[0] < temps[1] < temps[2]  # activations grow with the rows


def test_the_compiled_step_is_the_trainers_own(reports, one_device):
    """Scheduled sampling in the recipe adds its first (forward) pass to the compiled step."""
    config = tiny_config(batch_size=8)
    config.scheduled_sampling.update(schedule="linear", c=1e-3)
    mesh = precompile.mesh_for(config, one_device)
    sampled = precompile.compile_train_step(config, Transformer(model_config(config)), mesh)[0]
    assert sampled.xla_flops > 1.2 * reports[8].xla_flops  # forward + backward = 3 forwards


def test_a_program_over_memory_is_named_with_its_bytes(reports, one_device):
    train = reports[8]
    small = precompile.get_target("cpu:1", memory_gib=(train.total_bytes - 1) / 2**30)
    assert not train.fits(small) and train.fits(one_device)
    (problem,) = precompile.too_big([train], small)
    assert problem.startswith(f"train step needs {train.total_bytes:,} bytes")
    assert precompile.too_big([train], one_device) == []


def test_largest_batch_is_the_last_that_fits(reports):
    """Between 4 rows (fit) and 8 (do not): the search returns r that fits and r + 1 that not."""
    memory = (reports[4].total_bytes + reports[8].total_bytes) / 2
    target = precompile.get_target("cpu:1", memory_gib=memory / 2**30)
    rows, fits, over = precompile.largest_batch(tiny_config(), target)
    assert 4 <= rows < 8
    assert fits.total_bytes <= memory < over.total_bytes


@pytest.mark.parametrize(
    "name, message",
    [
        ("cpu:0", "expected cpu:N"),
        ("cpu:two", "expected cpu:N"),
        ("cpu:64", "xla_force_host_platform_device_count=64"),
        ("tpu-v5e-8", "expected cpu:N or a TPU topology"),
    ],
)
def test_bad_topologies_are_refused(name, message):
    with pytest.raises(precompile.PrecompileError, match=message):
        precompile.get_target(name)


def _cli(*args: str) -> subprocess.CompletedProcess:
    tiny = [
        "--config.vocab_size=96",
        f"--config.max_source_len={S}",
        f"--config.max_target_len={T}",
        "--config.eval_batch_size=8",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.model.num_heads=2",
        "--config.model.num_layers=1",
    ]
    command = [sys.executable, "-m", "tfjax", "precompile", "--config=configs/default.py", *tiny]
    # The CLI appends the device count to XLA_FLAGS (the suite's own flags stay).
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_on_eight_cpu_devices_exits_1_when_a_program_does_not_fit():
    out = _cli("--topology=cpu:8", "--config.mesh=(1,-1,1)", "--memory_gib=0.0001")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "cpu:8: 8 x cpu" in out.stdout and "mesh data 1 x fsdp 8 x tensor 1" in out.stdout
    assert "train step per device" in out.stdout and "beam-2 decoder per device" in out.stdout
    assert "error: train step needs" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.mesh=(3,-1,1)"], "do not divide the 8 devices"),
        (["--config.mesh=(8,1,1)", "--config.batch_size=12"], "batch_size=12 does not split"),
        (["--config.mesh=(8,1,1)", "--config.no_such_key=1"], "no_such_key"),
    ],
)
def test_cli_refuses_impossible_meshes_and_batches(args, message):
    out = _cli("--topology=cpu:8", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr


FSDP_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from test_precompile import tiny_config
from tfjax import precompile
from tfjax.model import Transformer
from tfjax.recipe import model_config
target = precompile.get_target("cpu:8")
out = {}
for mesh in [(8, 1, 1), (1, 8, 1)]:
    config = tiny_config(mesh=mesh)
    model = Transformer(model_config(config))
    train, _ = precompile.compile_train_step(config, model, precompile.mesh_for(config, target))
    out[str(mesh)] = [train.argument_bytes, train.alias_bytes, train.temp_bytes]
print(json.dumps(out))
"""


def test_fsdp_over_eight_devices_holds_an_eighth_of_the_state():
    """Data parallel keeps the whole state on each device; fsdp about an eighth of it."""
    env = env_with_xla_flag("--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    data_state, fsdp_state = result["(8, 1, 1)"][1], result["(1, 8, 1)"][1]  # donated = state
    # Leaves without an embed axis (feed-forward and attention biases) stay whole under fsdp.
    assert data_state / 8 <= fsdp_state < data_state / 6


# Compiling for a TPU needs libtpu (the "tpu" extra), not TPU hardware.
@pytest.fixture(scope="module")
def libtpu():
    return pytest.importorskip("libtpu")


@pytest.mark.parametrize("topology, mesh", [("v5e:2x4", (2, 4, 1)), ("v5p:2x2x4", (1, 16, 1))])
def test_tiny_train_step_compiles_for_tpu_topologies(libtpu, topology, mesh):
    target = precompile.get_target(topology)
    config = tiny_config(mesh=mesh, batch_size=32)
    model = Transformer(model_config(config))
    report = precompile.compile_train_step(config, model, precompile.mesh_for(config, target))[0]
    assert report.error == "" and report.fits(target)
    assert len(target.devices) == (8 if topology.startswith("v5e") else 16)
    assert target.memory_bytes == precompile.CHIPS[target.devices[0].device_kind].hbm_bytes
    assert report.argument_bytes > 0 and report.xla_flops > 0


def test_a_mesh_that_splits_a_physical_axis_is_refused(libtpu):
    target = precompile.get_target("v5e:4x4")
    with pytest.raises(precompile.PrecompileError, match="do not factor the physical 4x4 grid"):
        precompile.mesh_for(tiny_config(mesh=(8, 2, 1)), target)
    assert precompile.mesh_for(tiny_config(mesh=(4, 4, 1)), target).shape["fsdp"] == 4
