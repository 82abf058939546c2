"""Training throughput and model FLOPs utilisation of the jitted train step.

  python benchmarks/train_throughput.py [--workloads=w_small,w_base] [--steps=10] \
      [--dtypes=float32,bfloat16] [--loss_steps=200]
  python benchmarks/train_throughput.py --flax_wmt_dir=FLAX/examples/wmt [--workloads=...] \
      [--steps=10] [--rounds=3]

Workloads (random token ids, fixed seeds): batch 64 pairs, source 32 and target 32 tokens,
label smoothing 0.1, Adam. W-small: shared vocabulary 8,000, d_model 256, 3 + 3 layers,
4 heads, d_ff 1024. W-base: the paper's base with a shared vocabulary of 32,000.

Model FLOPs per step = 3 x forward (backward costs two forwards), forward = 2 x multiply-adds:
  encoder layer, per source token:   4 D^2 (q, k, v, out) + 2 D F (feed-forward) + 2 S D (attention)
  decoder layer, per target token:   4 D^2 + 2 T D (self) + 2 D^2 + 2 S D (cross: q, out, attention)
                                     + 2 D F;  per source token: 2 D^2 (cross k, v)
  logits, per target token:          D V
counted over every position of the padded batch (tfjax.precompile.model_flops). MFU = model
FLOPs per second / the matmul peak measured in the same run (the best of 20 jitted
2048 x 2048 jnp.dot: fp32, and bf16 inputs with fp32 accumulation). Each workload runs with
fp32 compute and with bf16 compute (parameters and optimizer state stay fp32). Memory is XLA's
own account of the compiled step: arguments + outputs - donated aliases + temporaries. With
--loss_steps=N, each dtype also trains W-small for N steps on 8 fixed random batches and the
two loss curves are printed side by side.
The tables are printed and appended to benchmarks/RESULTS.md.

With --flax_wmt_dir, only a comparison runs instead: google/flax's examples/wmt `train_step`,
imported from that directory at run time (benchmarks/flax_wmt_reference.py), beside tfjax's
jitted step on the same fp32 workloads, in one process. Each of --rounds rounds times, per
workload, one system then the other (which goes first alternates by round): an untimed step,
then --steps steps blocked on at the end. Both count target tokens/s as 64 x 32 / seconds per
step; the ratio tfjax / flax is given per round and as the median over rounds.
Matched: sizes, shared and tied embeddings, sinusoidal positions, ReLU feed-forward, dropout
0.1 on embeddings, sublayer outputs and (as the example does; tfjax's activation dropout is
set to match) after the feed-forward ReLU, none on attention probabilities, label smoothing
0.1, Adam(0.9, 0.98, 1e-9) with fp32 parameters and compute, one device, state donated, the
same token ids, dropout keys folded with the step.
Different, as each code base is written: the example is pre-LN with a final LayerNorm per
stack (tfjax post-LN, the paper's), has no biases in the attention projections, scales
logits rather than embeddings by sqrt(d_model), builds float attention masks from the token
ids, materialises the smoothed one-hot targets [B, T, V] for the loss and autodiffs it
(tfjax: a fused custom-gradient loss), reports accuracy (tfjax: hits and the gradient norm),
and uses optax.adamw with weight decay 0 on its configs/default.py schedule (peak 2e-3,
1,000 warmup steps; tfjax's here 1e-3, 4,000). Its collectives need the "batch" axis that
its pmap binds: here a one-device shard_map inside jax.jit binds it, compiling to pmap's one
all-reduce over one device, which tfjax's step does not have. The first-step loss of each
(unsmoothed, per target token, fresh parameters) checks that both train the same problem.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax_wmt_reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from provenance import code_version, machine

from tfjax import sharding, train_lib
from tfjax.model import Transformer, preset
from tfjax.precompile import model_flops, program_bytes

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["w_small", "w_base"], "which workloads to run")
flags.DEFINE_integer("steps", 10, "timed steps per workload or block (after a warm-up step)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes to run each workload in")
flags.DEFINE_integer("loss_steps", 0, "train W-small this many steps per dtype; 0: skip")
flags.DEFINE_string(
    "flax_wmt_dir", "", "flax's examples/wmt: compare with its train_step (fp32) instead"
)
flags.DEFINE_integer("rounds", 3, "interleaved rounds of the flax comparison", lower_bound=1)
BATCH, SOURCE, TARGET = 64, 32, 32
WORKLOADS = {
    "w_small": dict(vocab_size=8000, d_model=256, num_layers=3, num_heads=4, d_ff=1024),
    "w_base": dict(vocab_size=32000),
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def matmul_peak(dtype: jnp.dtype, n: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of a jitted n x n matmul (float32 accumulation), the best of `repeats`.

    The best, not the median: a peak is what the cores can do, and on a shared machine the
    slower repeats measure the neighbours.
    """
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - tick)
    return 2 * n**3 / min(times)


def random_batch(vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs = rng.integers(4, vocab, size=(BATCH, SOURCE)).astype(np.int32)
    targets = rng.integers(4, vocab, size=(BATCH, TARGET)).astype(np.int32)
    decoder_inputs = np.concatenate([np.full((BATCH, 1), 2, np.int32), targets[:, :-1]], axis=1)
    return dict(inputs=inputs, targets=targets, decoder_inputs=decoder_inputs)


def step_memory(step: train_lib.JittedTrainStep, state, batch) -> int:
    """Bytes XLA needs for one compiled train step: arguments + outputs - aliases + temporaries."""
    return program_bytes(step.lower(state, batch, jax.random.key(1)).compile())


def setup(name: str, dtype: str, **overrides: Any):
    """(model config, state, jitted step, placed batch, mesh) of a workload."""
    cfg = preset("base", **WORKLOADS[name], max_len=64, dtype=jnp.dtype(dtype), **overrides)
    model = Transformer(cfg)
    batch = random_batch(cfg.vocab_size, np.random.default_rng(0))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    optimizer = train_lib.make_optimizer(train_lib.rsqrt_schedule(1e-3, 4000))
    state, shardings = train_lib.create_train_state(
        jax.random.key(0), model, optimizer, batch, mesh
    )
    options = train_lib.StepOptions(label_smoothing=0.1)
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, options)
    return cfg, state, step, sharding.place_batch(batch, mesh), mesh


def run_workload(name: str, dtype: str, steps: int) -> dict[str, float]:
    cfg, state, step, batch, _ = setup(name, dtype)
    memory = step_memory(step, state, batch)
    rng = jax.random.key(1)
    tick = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - tick
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    return dict(
        compile_s=compile_s,
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        flops=model_flops(cfg, BATCH, SOURCE, TARGET),
        memory=memory,
    )


def loss_curve(dtype: str, steps: int, every: int = 25) -> list[float]:
    """W-small's mean loss over each `every` steps, trained on 8 fixed random batches."""
    _, state, step, _, mesh = setup("w_small", dtype)
    rng = np.random.default_rng(0)
    batches = [sharding.place_batch(random_batch(8000, rng), mesh) for _ in range(8)]
    losses, curve = [], []
    for i in range(steps):
        state, metrics = step(state, batches[i % 8], jax.random.fold_in(jax.random.key(1), i))
        losses.append(float(metrics["loss"]) / float(metrics["tokens"]))
        if len(losses) == every:
            curve.append(float(np.mean(losses)))
            losses = []
    return curve


def timed_block(step: Callable, state: Any, batch: Any, rng: jax.Array) -> tuple[Any, float]:
    """(the state after one untimed and --steps timed steps, seconds per timed step).

    The untimed step first brings back into cache what the other system's block evicted.
    """
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    tick = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - tick) / FLAGS.steps


def flax_comparison(directory: str) -> list[str]:
    """The table of tfjax's and the flax example's fp32 target tokens/s, in interleaved rounds."""
    example, defaults = flax_wmt_reference.load(directory)
    runs, states, first_loss = {}, {}, {}
    for name in FLAGS.workloads:
        # The example also drops out after the feed-forward activation: so does tfjax here.
        cfg, state, step, batch, _ = setup(name, "float32", activation_dropout_rate=0.1)
        ref_state, ref_step, ref_batch, ref_rng = flax_wmt_reference.setup(
            example, defaults, cfg, batch
        )
        rng = jax.random.key(1)
        # The first steps compile, outside the timing; their unsmoothed loss per target token
        # shows whether both train the same problem.
        state, metrics = step(state, batch, rng)
        ref_state, ref_metrics = ref_step(ref_state, ref_batch, ref_rng)
        first_loss[name] = (
            float(metrics["nll"] / metrics["tokens"]),
            float(ref_metrics["loss"] / ref_metrics["denominator"]),
        )
        runs[name, "tfjax"], states[name, "tfjax"] = (step, batch, rng), state
        runs[name, "flax"], states[name, "flax"] = (ref_step, ref_batch, ref_rng), ref_state
    rates = {key: [] for key in runs}
    for r in range(FLAGS.rounds):
        for name in FLAGS.workloads:
            # Alternating who goes first spreads any cost of following the other evenly.
            for system in ("tfjax", "flax") if r % 2 == 0 else ("flax", "tfjax"):
                step, batch, rng = runs[name, system]
                states[name, system], seconds = timed_block(step, states[name, system], batch, rng)
                rates[name, system].append(BATCH * TARGET / seconds)
    versions = (
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"python {platform.python_version()}"
    )
    lines = [
        f"### train_throughput vs flax examples/wmt train_step, {datetime.date.today()}, "
        f"{machine()}, {versions}, {code_version()}, {flax_wmt_reference.describe(directory)}",
        "",
        f"fp32, batch {BATCH} pairs of {SOURCE} + {TARGET} tokens, rounds: {FLAGS.rounds}. Per "
        f"round and workload, each system runs an untimed step then {FLAGS.steps} timed steps; "
        f"who goes first alternates by round. Target tokens/s = {BATCH} x {TARGET} / seconds "
        "per step, for both.",
        "",
        "| workload | round | tfjax target tokens/s | flax example target tokens/s "
        "| tfjax / flax |",
        "|---|---|---|---|---|",
    ]
    for name in FLAGS.workloads:
        ours, theirs = rates[name, "tfjax"], rates[name, "flax"]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        for r, (a, b, ratio) in enumerate(zip(ours, theirs, ratios, strict=True)):
            lines.append(f"| {name} | {r + 1} | {a:.0f} | {b:.0f} | {ratio:.2f}x |")
        lines.append(
            f"| {name} | median | {statistics.median(ours):.0f} "
            f"| {statistics.median(theirs):.0f} | {statistics.median(ratios):.2f}x |"
        )
    lines += ["", "First-step loss (unsmoothed, per target token, fresh parameters):", ""]
    lines += [
        f"- {name}: tfjax {a:.3f}, flax example {b:.3f}" for name, (a, b) in first_loss.items()
    ]
    return lines


def throughput_tables() -> list[str]:
    """Each workload's throughput, MFU and memory per dtype, and with --loss_steps loss curves."""
    peak32, peak16 = matmul_peak(jnp.float32), matmul_peak(jnp.bfloat16)
    where = f"{machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}"
    versions = f"jax {jax.__version__}"
    lines = [
        f"### train_throughput, {datetime.date.today()}, {where}, {versions}, {code_version()}",
        "",
        f"matmul peak (2048^2 jnp.dot): fp32 {peak32 / 1e9:.1f} GFLOP/s, "
        f"bf16 inputs / fp32 accumulation {peak16 / 1e9:.1f} GFLOP/s",
        "",
        "| workload | compile s | step s median (min-max) | target tokens/s | GFLOP/step "
        "| MFU vs fp32 peak | MFU vs bf16 peak | step memory MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in FLAGS.workloads:
        for dtype in FLAGS.dtypes:
            r = run_workload(name, dtype, FLAGS.steps)
            rate = r["flops"] / r["median_s"]
            lines.append(
                f"| {name} {jnp.dtype(dtype).name} | {r['compile_s']:.1f} | {r['median_s']:.3f} "
                f"({r['min_s']:.3f}-{r['max_s']:.3f}) | {BATCH * TARGET / r['median_s']:.0f} "
                f"| {r['flops'] / 1e9:.1f} | {rate / peak32:.1%} | {rate / peak16:.1%} "
                f"| {r['memory'] / 2**20:.0f} |"
            )
    if FLAGS.loss_steps:
        curves = {dtype: loss_curve(dtype, FLAGS.loss_steps) for dtype in FLAGS.dtypes}
        lines += ["", "W-small loss per token, mean of each 25 steps:", ""]
        lines += ["| steps | " + " | ".join(FLAGS.dtypes) + " |", "|---" * (1 + len(curves)) + "|"]
        for i, values in enumerate(zip(*curves.values(), strict=True)):
            cells = " | ".join(f"{v:.4f}" for v in values)
            lines.append(f"| {i * 25 + 1}-{(i + 1) * 25} | {cells} |")
    return lines


def main(argv: list[str]) -> None:
    del argv
    lines = flax_comparison(FLAGS.flax_wmt_dir) if FLAGS.flax_wmt_dir else throughput_tables()
    text = "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    app.run(main)
