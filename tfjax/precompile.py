"""Ahead-of-time compiles of the train step and beam decoder for a device topology: memory, FLOPs.

Nothing is allocated: the state and batch are jax.ShapeDtypeStructs carrying their shardings,
so a laptop can compile a recipe for a TPU pod (with libtpu installed) or for N simulated CPU
devices, and learn before a launch whether each program fits in a chip's memory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfjax import generate, recipe, sharding, train_lib
from tfjax.data import train_batch_shapes
from tfjax.model import Transformer, TransformerConfig
from tfjax.train_lib import TrainState


class PrecompileError(ValueError):
    """The topology, mesh or batch cannot be compiled for."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation, from the Cloud TPU system-architecture pages."""

    name: str  # the generation's Cloud name (v5e, ...)
    hbm_bytes: int  # "HBM capacity per chip"; the pages give GB, read here as 10^9 bytes
    peak_flops: float  # "peak compute per chip (bf16)", FLOP/s


# device_kind -> Chip. GB read as 10^9 bytes undercounts a GiB by 7%: a program this says
# fits leaves at least that much room for the runtime's own buffers.
CHIPS = {
    "TPU v4": Chip("v4", 32 * 2**30, 275e12),  # the v4 page gives 32 GiB
    "TPU v5 lite": Chip("v5e", 16 * 10**9, 197e12),
    "TPU v5": Chip("v5p", 95 * 10**9, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * 10**9, 918e12),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for, with each one's memory and peak rate where known."""

    name: str  # as given: "v5e:2x4", "cpu:8"
    devices: tuple[Any, ...]
    memory_bytes: int | None  # per device
    memory_source: str  # where memory_bytes comes from
    peak_flops: float | None  # per device, FLOP/s (TPU: bf16)

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def get_target(
    name: str, memory_gib: float | None = None, peak_tflops: float | None = None
) -> Target:
    """The devices of cpu:N (this process's first N CPU devices) or of a TPU topology (v5e:2x4).

    A TPU topology needs libtpu (`pip install -e ".[tpu]"`), not TPU hardware. memory_gib and
    peak_tflops override the per-device figures (a CPU device has no peak of its own here).
    """
    if name.startswith("cpu:"):
        devices, memory, source, peak = _cpu(name)
    else:
        devices, memory, source, peak = _tpu(name)
    if memory_gib is not None:
        memory, source = int(memory_gib * 2**30), "--memory_gib"
    if peak_tflops is not None:
        peak = peak_tflops * 1e12
    return Target(name, tuple(devices), memory, source, peak)


def _cpu(name: str) -> tuple[list[Any], int, str, None]:
    count = _count(name.removeprefix("cpu:"), name)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise PrecompileError(
            f"--topology={name} needs {count} CPU devices and this process has {len(devices)}: "
            f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
    return devices[:count], memory, f"this host's memory / {count}", None


def _count(text: str, name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PrecompileError(f"--topology={name}: expected cpu:N with N >= 1")
    return int(text)


def _tpu(name: str) -> tuple[list[Any], int | None, str, float | None]:
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        raise PrecompileError(
            f"--topology={name}: expected cpu:N or a TPU topology such as v5e:2x4 or v5p:2x2x4"
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not a TPU VM: no metadata server
    # Compiling claims no chip, so several processes may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise PrecompileError(
            f"--topology={name}: libtpu could not describe it ({e}). Compiling for TPUs needs "
            'libtpu: pip install -e ".[tpu]"'
        ) from e
    devices = list(topology.devices)
    chip = CHIPS.get(devices[0].device_kind)
    if chip is None:
        return devices, None, f"unknown for {devices[0].device_kind}: pass --memory_gib", None
    return devices, chip.hbm_bytes, f"{chip.name} HBM per chip, Cloud TPU docs", chip.peak_flops


@dataclasses.dataclass(frozen=True)
class Report:
    """One compiled program's figures per device."""

    program: str  # "train step", "beam-4 decoder"
    workload: str  # its batch and lengths, in words
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once)
    temp_bytes: int
    xla_flops: float  # XLA's cost analysis of the per-device program (loop bodies once)
    model_flops: float | None  # the formula's FLOPs for one call, / devices
    compile_s: float
    error: str = ""  # the compiler's refusal, e.g. out of memory, when it did not compile

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, target: Target) -> bool:
        return not self.error and (
            target.memory_bytes is None or self.total_bytes <= target.memory_bytes
        )


def program_bytes(compiled: jax.stages.Compiled) -> int:
    """Bytes a compiled program needs per device: arguments + outputs - aliases + temporaries."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def model_flops(cfg: TransformerConfig, batch: int, s: int, t: int) -> float:
    """Training FLOPs of one step on [batch, s] sources and [batch, t] targets.

    3 x forward (the backward costs two forwards), forward = 2 x multiply-adds, counted over
    every position of the padded batch:
      encoder layer, per source token:  4 D^2 (q, k, v, out) + 2 D F + 2 S D (attention)
      decoder layer, per target token:  4 D^2 + 2 T D (self) + 2 D^2 + 2 S D (cross: q, out,
                                        attention) + 2 D F;  per source token: 2 D^2 (cross k, v)
      logits, per target token:         D V
    """
    d, f, v = cfg.d_model, cfg.d_ff, cfg.target_vocab
    encoder = cfg.num_layers * batch * s * (4 * d * d + 2 * d * f + 2 * s * d)
    decoder_target = batch * t * (4 * d * d + 2 * t * d + 2 * d * d + 2 * s * d + 2 * d * f)
    decoder_source = batch * s * 2 * d * d
    decoder = cfg.decoder_layers * (decoder_target + decoder_source)
    logits = batch * t * d * v
    return 3 * 2 * (encoder + decoder + logits)


def _report(
    program: str, workload: str, lowered: jax.stages.Lowered, flops: float | None
) -> Report:
    tick = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA refuses programs over the chip's memory at compile time
        message = str(e).strip().splitlines()[0]
        return Report(
            program, workload, 0, 0, 0, 0, 0.0, flops, time.perf_counter() - tick, message
        )
    seconds = time.perf_counter() - tick
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # a list in older jax
    return Report(
        program,
        workload,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
        float((cost or {}).get("flops", 0.0)),
        flops,
        seconds,
    )


def batch_shards(mesh: Mesh) -> int:
    """How many ways the mesh splits a batch's rows (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def compile_train_step(
    config: ml_collections.ConfigDict, model: Transformer, mesh: Mesh
) -> tuple[Report, TrainState]:
    """The trainer's step for `config` on `mesh`, compiled from abstract state and batch.

    Returns its report and the abstract state (whose parameters the decoder reuses). A
    distillation teacher (config.distill) is not compiled in: its parameters would add
    their bytes to the arguments.
    """
    rows = config.batch_size
    if rows % batch_shards(mesh):
        raise PrecompileError(
            f"batch_size={rows} does not split over the mesh's {batch_shards(mesh)} batch shards "
            f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})"
        )
    shapes = train_batch_shapes(rows, config.max_source_len, config.max_target_len, config.pack)
    rows_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=rows_sharding) for k, v in shapes.items()
    }
    optimizer, options = recipe.train_step_options(config)
    state, shardings = train_lib.abstract_train_state(model, optimizer, batch, mesh)
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, options)
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    flops = model_flops(model.config, rows, config.max_source_len, config.max_target_len)
    workload = (
        f"batch {rows} rows x {config.max_source_len} source / {config.max_target_len} target "
        f"tokens ({rows // batch_shards(mesh)} rows per batch shard)"
    )
    lowered = step.lower(state, batch, rng)
    return _report("train step", workload, lowered, flops / mesh.size), state


def compile_decoder(
    config: ml_collections.ConfigDict, model: Transformer, params: Any, mesh: Mesh, beam: int
) -> Report:
    """The trainer's evaluation beam search (config.eval_batch_size sentences), compiled."""
    rows, length = config.eval_batch_size, config.max_source_len
    inputs = jax.ShapeDtypeStruct(
        (rows, length), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())
    )
    lowered = generate.translate_beam.lower(
        model,
        params,
        inputs,
        generate.translation_spec(),
        max_decode_len=config.max_target_len,
        beam_size=beam,
        alpha=config.eval_alpha,
    )
    workload = f"{rows} sentences x {length} source tokens, {config.max_target_len} steps"
    return _report(f"beam-{beam} decoder", workload, lowered, None)


def mesh_for(config: ml_collections.ConfigDict, target: Target) -> Mesh:
    """The config's (data, fsdp, tensor) sizes laid out on the target's devices."""
    try:
        return sharding.make_mesh(tuple(config.mesh), target.devices)
    except ValueError as e:
        raise PrecompileError(f"--topology={target.name}: {e}") from e


def precompile(
    config: ml_collections.ConfigDict, target: Target, beam: int
) -> tuple[Mesh, list[Report]]:
    """Compile the train step and the beam decoder of `config` for `target`."""
    mesh = mesh_for(config, target)
    model = Transformer(recipe.model_config(config))
    train, state = compile_train_step(config, model, mesh)
    return mesh, [train, compile_decoder(config, model, state.params, mesh, beam)]


def largest_batch(
    config: ml_collections.ConfigDict,
    target: Target,
    known: Report | None = None,
    limit: int = 4096,
    on_probe: Callable[[int, Report], None] | None = None,
) -> tuple[int, Report | None, Report | None]:
    """The most rows per batch shard whose train step fits in the target's memory.

    Each probe is a compile. Memory grows about linearly with rows, so after two probes the
    next is where the line through the nearest two reaches the capacity (doubling or halving
    from the config's own rows until then); the interval (fits, does not) shrinks at every
    probe, so the answer is exact. `known`: the config's own train-step report, if compiled;
    `on_probe(rows, report)` is called after each compile (they take minutes for big models).

    Returns (rows per shard, the report of that batch, the report of one more row); rows is
    0 when even one row per shard does not fit.
    """
    mesh = mesh_for(config, target)
    model = Transformer(recipe.model_config(config))
    shards = batch_shards(mesh)
    rows = max(config.batch_size // shards, 1)
    reports: dict[int, Report] = {rows: known} if known is not None else {}

    def fits(rows: int) -> bool:
        if rows not in reports:
            trial = ml_collections.ConfigDict(config.to_dict())
            trial.batch_size = rows * shards
            reports[rows] = compile_train_step(trial, model, mesh)[0]
            if on_probe is not None:
                on_probe(rows, reports[rows])
        return reports[rows].fits(target)

    low, high = 0, limit + 1  # low fits (0 trivially); high is taken not to
    guess = rows
    while high - low > 1:
        guess = min(max(guess, low + 1), high - 1)
        low, high = (guess, high) if fits(guess) else (low, guess)
        guess = _next_guess(reports, low, high, target.memory_bytes)
    return low, reports.get(low), reports.get(high)


def _next_guess(reports: dict[int, Report], low: int, high: int, capacity: int | None) -> int:
    """Rows where memory, linear through the two compiled probes nearest the boundary, is full."""
    measured = sorted(r for r, report in reports.items() if not report.error)
    near = sorted(measured, key=lambda r: min(abs(r - low), abs(r - high)))[:2]
    if capacity is None or len(near) < 2:  # no line yet: double up, or halve down
        return 2 * low if high not in reports else (low + high) // 2
    a, b = sorted(near)
    slope = (reports[b].total_bytes - reports[a].total_bytes) / (b - a)
    if slope <= 0:
        return (low + high) // 2
    return a + int((capacity - reports[a].total_bytes) // slope)


def _gib(n: float) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(report: Report, target: Target) -> str:
    """A two-column table of one program's per-device figures."""
    rows: list[tuple[str, str]] = []
    if report.error:
        rows.append(("compile", f"refused: {report.error}"))
    else:
        capacity = target.memory_bytes
        share = f" = {report.total_bytes / capacity:.0%} of {_gib(capacity)}" if capacity else ""
        rows += [
            ("arguments", _gib(report.argument_bytes)),
            ("outputs", _gib(report.output_bytes)),
            ("donated (outputs in arguments' buffers)", "-" + _gib(report.alias_bytes)),
            ("temporaries", _gib(report.temp_bytes)),
            ("total", _gib(report.total_bytes) + share),
            ("fits", "yes" if report.fits(target) else "NO"),
            ("XLA GFLOP (loop bodies counted once)", f"{report.xla_flops / 1e9:,.1f}"),
        ]
    if report.model_flops is not None:
        rows.append(
            ("model GFLOP (tfjax.precompile.model_flops)", f"{report.model_flops / 1e9:,.1f}")
        )
        if target.peak_flops:
            ms = report.model_flops / target.peak_flops * 1e3
            rows.append(
                (
                    f"ms at peak ({target.peak_flops / 1e12:g} TFLOP/s bf16)",
                    f"{ms:,.2f}  (MFU = this / measured step ms)",
                )
            )
    rows.append(("compile s", f"{report.compile_s:.1f}"))
    width = max(len(k) for k, _ in rows)
    head = f"{report.program} per device: {report.workload}"
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def describe(target: Target, mesh: Mesh) -> str:
    """One line: the devices, hosts, per-device memory and peak, and the mesh."""
    kind = target.devices[0].device_kind
    memory = _gib(target.memory_bytes) if target.memory_bytes else "unknown"
    peak = f"{target.peak_flops / 1e12:g} TFLOP/s" if target.peak_flops else "unknown"
    axes = " x ".join(f"{k} {v}" for k, v in mesh.shape.items())
    return (
        f"{target.name}: {len(target.devices)} x {kind} in {target.hosts} process(es); memory "
        f"per device {memory} ({target.memory_source}); peak {peak}; mesh {axes}"
    )


def too_big(reports: Sequence[Report], target: Target) -> list[str]:
    """A sentence per program that does not fit, naming it and its bytes."""
    out = []
    for r in reports:
        if r.error:
            out.append(f"{r.program} did not compile for {target.name}: {r.error}")
        elif not r.fits(target):
            out.append(
                f"{r.program} needs {r.total_bytes:,} bytes ({_gib(r.total_bytes)}) per device; "
                f"{target.name} has {target.memory_bytes:,} ({_gib(target.memory_bytes)})"
            )
    return out
