"""Host cost per step of the trainer's real loop, with a step that costs (nearly) nothing.

  python benchmarks/loop_overhead.py --data_dir=MULTI30K_FOLDER [--steps=300] [--workdir=DIR]

Workload: configs/multi30k_de_en.py's data (folder dataset, de -> en, batch 64 packed rows of
64 + 64 tokens, log_every 50), with a tiny model (d_model 16, d_ff 32, 2 heads, 1 + 1 layers),
a vocabulary of --vocab_size (512: at the recipe's 8,000 the [64 x 64, 8000] logits and loss
alone took 172 ms a step on a 2-core CPU), --steps train steps, and evaluation and
checkpoints only after the last step (eval_every and checkpoint_every past it). Four
measurements, each in its own process:

  free      `trainer.train_and_evaluate` as a user runs it, with the jitted train step
            replaced by one that only counts the batch's tokens and the step (the state is
            donated and kept in its shardings as the real step's): the loop's wall time per
            step is then its host cost (pipeline, packing, placement, dispatch, logging,
            progress) and 1000 / that is the steps/s ceiling. The loop has no timing hook, so
            this process wraps `trainer.MetricWriter.write` to stamp the wall clock as each
            train record (every log_every steps) is written. The loop time is from the first
            train record to the last: it leaves out setup, compilation (all in the first
            window) and the final evaluation and checkpoint (after the last record), and each
            window holds exactly one summary, progress-bar postfix and record write.
  loop      the same with the real step of the tiny model (about 40 ms on 2 cores: XLA:CPU
            runs its ~130 small ops at about 0.3 ms each), timed the same way.
  step      that jitted train step alone, built as the trainer builds it, on one placed
            batch; --steps calls, blocking only after the last: seconds per compiled step.
            loop - step is what the host adds to a real step (ideally nothing: the next
            batch is read and placed while the step runs).
  pipeline  `data.train_dataset` over the tokenized train split the trainer uses
            (`trainer.train_source`): batches per second after 10 of warm-up; then
            `sharding.place_batch` of --steps fetched batches, each placed and waited for
            on its own: milliseconds per batch.

Targets: free-step loop <= 4 ms per step, ceiling >= 250 steps/s. Ratio = figure /
reference; for the ms rows lower is better. The table is printed and appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from provenance import code_version, machine

ROOT = Path(__file__).resolve().parents[1]
# The recipes import `configs.default`, found from the repository root.
sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "the Multi30k folder of text files (train.de, ...)")
flags.DEFINE_integer("steps", 300, "train steps of the loop; also compiled steps and batches timed")
flags.DEFINE_string(
    "workdir", None, "where data, tokenizer and checkpoints go; its run/ is replaced (default: tmp)"
)
flags.DEFINE_integer(
    "vocab_size",
    512,
    "the tokenizer's vocabulary; the recipe's 8000 makes the step ~170 ms on 2 cores",
)
flags.DEFINE_enum(
    "mode", None, ["free", "loop", "step", "pipeline"], "internal: run one measurement"
)
RECIPE = ROOT / "configs/multi30k_de_en.py"
TINY = dict(d_model=16, d_ff=32, num_heads=2, num_layers=1)
RESULTS = Path(__file__).with_name("RESULTS.md")
MARK = "loop_overhead result: "  # prefixes the JSON line a measuring process prints


def load_recipe():
    """The Multi30k recipe with the tiny model, --steps, and no evaluation before the end."""
    from tfjax import cli

    later = FLAGS.steps + 1
    overrides = [f"--config.model.{k}={v}" for k, v in TINY.items()] + [
        f"--config.data_dir={FLAGS.data_dir}",
        f"--config.vocab_size={FLAGS.vocab_size}",
        f"--config.num_train_steps={FLAGS.steps}",
        f"--config.eval_every={later}",
        f"--config.checkpoint_every={later}",
        "--config.eval_decode_sentences=8",
    ]
    return cli.load_config(str(RECIPE), overrides)


def measure_loop(config, run_dir: Path) -> dict:
    """Loop wall seconds per step between the first and last train records (see docstring)."""
    from tfjax import trainer

    stamps: list[tuple[int, float]] = []
    write = trainer.MetricWriter.write

    def stamped(self, step: int, split: str, values: dict) -> None:
        if split == "train":
            stamps.append((step, time.perf_counter()))
        write(self, step, split, values)

    trainer.MetricWriter.write = stamped
    tick = time.perf_counter()
    trainer.train_and_evaluate(config, str(run_dir))
    total_s = time.perf_counter() - tick
    windows = [
        (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(stamps, stamps[1:], strict=False)
    ]
    (first, t_first), (last, t_last) = stamps[0], stamps[-1]
    return dict(
        loop_s_per_step=(t_last - t_first) / (last - first),
        timed_steps=last - first,
        window_s=windows,
        total_s=total_s,
    )


def measure_free(config, run_dir: Path) -> dict:
    """measure_loop with the trainer's jitted step replaced by a (nearly) free one."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from tfjax import train_lib

    class FreeStep(train_lib.JittedTrainStep):
        """Called as the real step; counts the batch's target tokens and the step, no model."""

        def __init__(self, model, optimizer, state_shardings, mesh, options, **kwargs):
            super().__init__(model, optimizer, state_shardings, mesh, options, **kwargs)

            def free(state, batch, rng, teacher_params):
                tokens = jnp.sum(batch["targets"] != 0).astype(jnp.float32)
                metrics = dict.fromkeys(["loss", "nll", "correct", "grad_norm"], 0.0 * tokens)
                metrics.update(tokens=tokens, learning_rate=0.0 * tokens)
                return state.replace(step=state.step + 1), metrics

            replicated = NamedSharding(mesh, PartitionSpec())
            self._jitted = jax.jit(
                free, donate_argnums=0, out_shardings=(state_shardings, replicated)
            )

    train_lib.JittedTrainStep = FreeStep
    return measure_loop(config, run_dir)


def prepared(config, run_dir: Path):
    """(mesh, train source, tokenizer) from what the loop process built in run_dir: the
    tokenized train split, as the trainer reads it."""
    from etils import epath

    from tfjax import recipe, sharding, trainer
    from tfjax.data import load_or_train_tokenizer

    workdir = epath.Path(run_dir)
    data = recipe.prepare_data(config, workdir)
    tokenizer = load_or_train_tokenizer(
        workdir / "spm.model", data.source("train"), vocab_size=config.vocab_size
    )
    source = trainer.train_source(data, tokenizer, recipe.pipeline_options(config), workdir)
    return sharding.make_mesh(tuple(config.mesh)), source, tokenizer


def measure_step(config, run_dir: Path) -> dict:
    """Seconds per call of the trainer's jitted step on one placed batch, blocking at the end."""
    import jax

    from tfjax import recipe, sharding, train_lib
    from tfjax.data import train_dataset
    from tfjax.model import Transformer

    mesh, source, tokenizer = prepared(config, run_dir)
    host_batch = next(iter(train_dataset(source, tokenizer, recipe.pipeline_options(config))))
    model = Transformer(recipe.model_config(config))
    optimizer, options = recipe.train_step_options(config)
    state, shardings = train_lib.create_train_state(
        jax.random.key(config.seed), model, optimizer, host_batch, mesh
    )
    step = train_lib.JittedTrainStep(model, optimizer, shardings, mesh, options)
    batch, rng = sharding.place_batch(host_batch, mesh), jax.random.key(config.seed + 1)
    state, metrics = step(state, batch, rng)  # compiles
    jax.block_until_ready((state, metrics))
    tick = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return dict(step_s=(time.perf_counter() - tick) / FLAGS.steps)


def measure_pipeline(config, run_dir: Path) -> dict:
    """Batches per second out of the recipe's train pipeline; seconds per batch placement."""
    import jax

    from tfjax import recipe, sharding
    from tfjax.data import train_dataset

    mesh, source, tokenizer = prepared(config, run_dir)
    iterator = iter(train_dataset(source, tokenizer, recipe.pipeline_options(config)))
    for _ in range(10):
        next(iterator)
    tick = time.perf_counter()
    batches = [next(iterator) for _ in range(FLAGS.steps)]
    pipeline_s = time.perf_counter() - tick
    jax.block_until_ready(sharding.place_batch(batches[0], mesh))  # first-call setup
    times = []
    for batch in batches:
        tick = time.perf_counter()
        jax.block_until_ready(sharding.place_batch(batch, mesh))
        times.append(time.perf_counter() - tick)
    return dict(
        batches_per_s=FLAGS.steps / pipeline_s,
        place_s=statistics.mean(times),
        place_median_s=statistics.median(times),
        platform=jax.devices()[0].platform,
    )


def child(mode: str) -> None:
    """Run one measurement and print its result as one marked JSON line."""
    config = load_recipe()
    # The free loop trains in its own folder: a checkpoint in run/ would be resumed.
    run_dir = Path(FLAGS.workdir) / ("free" if mode == "free" else "run")
    measure = dict(
        free=measure_free, loop=measure_loop, step=measure_step, pipeline=measure_pipeline
    )[mode]
    print(MARK + json.dumps(measure(config, run_dir)), flush=True)


def run_child(mode: str, workdir: Path) -> dict:
    """One measurement in a fresh process, so no compiled programs or threads carry over."""
    argv = [sys.executable, __file__, f"--mode={mode}", f"--steps={FLAGS.steps}"]
    argv += [f"--data_dir={FLAGS.data_dir}", f"--workdir={workdir}"]
    argv += [f"--vocab_size={FLAGS.vocab_size}"]
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        sys.exit(f"loop_overhead: the {mode} process failed (exit {done.returncode})")
    return json.loads(lines[-1][len(MARK) :])


def _windows(loop: dict) -> str:
    window_ms = [1e3 * s for s in loop["window_s"]]
    return f"windows {min(window_ms):.2f}-{max(window_ms):.2f} ms/step"


def table(
    free: dict, loop: dict, step: dict, pipe: dict, machine: str, versions: str, workload: str
) -> str:
    free_ms = 1e3 * free["loop_s_per_step"]
    loop_ms, step_ms = 1e3 * loop["loop_s_per_step"], 1e3 * step["step_s"]
    added_ms = loop_ms - step_ms
    rows = [
        ("free-step loop ms/step", f"{free_ms:.2f} ({_windows(free)})", "<= 4", free_ms / 4),
        ("steps/s ceiling", f"{1000 / free_ms:.0f}", ">= 250", 1000 / free_ms / 250),
        (
            "tiny-model loop ms/step",
            f"{loop_ms:.2f} ({_windows(loop)})",
            f"compiled step {step_ms:.2f}",
            loop_ms / step_ms,
        ),
        (
            "host ms added to a real step",
            f"{added_ms:.2f} (loop - compiled step)",
            f"free-step loop {free_ms:.2f}",
            added_ms / free_ms,
        ),
        (
            "pipeline batches/s",
            f"{pipe['batches_per_s']:.0f}",
            ">= 250 (the ceiling's target)",
            pipe["batches_per_s"] / 250,
        ),
        (
            "placement ms/batch",
            f"{1e3 * pipe['place_s']:.3f} (median {1e3 * pipe['place_median_s']:.3f})",
            f"free-step loop {free_ms:.2f} ms/step",
            pipe["place_s"] * 1e3 / free_ms,
        ),
    ]
    lines = [
        "| workload | figure | reference / target | ratio | machine | versions |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {workload} | {name}: {value} | {ref} | {ratio:.2f} | {machine} | {versions} |"
        for name, value, ref, ratio in rows
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.mode:
        child(FLAGS.mode)
        return
    if not FLAGS.data_dir or not Path(FLAGS.data_dir).is_dir():
        sys.exit(f"loop_overhead: no Multi30k folder at {FLAGS.data_dir}; pass --data_dir=<folder>")
    workdir = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="loop_overhead_"))
    config = load_recipe()
    if FLAGS.steps < 2 * config.log_every:
        sys.exit(f"loop_overhead: --steps must be >= 2 x log_every ({2 * config.log_every})")
    for run in ("run", "free"):  # a checkpoint there would be resumed
        shutil.rmtree(workdir / run, ignore_errors=True)
    try:
        loop = run_child("loop", workdir)  # builds the data and tokenizer the others reuse
        free = run_child("free", workdir)
        step = run_child("step", workdir)
        pipe = run_child("pipeline", workdir)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    import flax
    import grain
    import jax
    import jaxlib

    where = f"{machine()}, {pipe['platform']}"
    versions = (
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
        f"grain {grain.__version__}, python {platform.python_version()}"
    )
    m = config.model
    workload = (
        f"multi30k {config.source_lang}-{config.target_lang}, d_model {m.d_model}, d_ff {m.d_ff}, "
        f"{m.num_heads} heads, {m.num_layers}+{m.num_layers} layers, vocab {config.vocab_size}, "
        f"batch {config.batch_size} "
        f"{'packed' if config.pack else 'padded'} {config.max_source_len}+"
        f"{config.max_target_len}, log_every {config.log_every}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join(
        [
            f"### loop_overhead, {datetime.date.today()}, {where}, {versions}, {code_version()}",
            "",
            f"{FLAGS.steps} steps; the loop timed over the {loop['timed_steps']} steps after its "
            f"first record; the whole train_and_evaluate took {loop['total_s']:.1f} s with the "
            f"tiny model, {free['total_s']:.1f} s with the free step; "
            f"load average after the run: {load}",
            "",
            table(free, loop, step, pipe, where, versions, workload),
        ]
    )
    print(text)
    with RESULTS.open("a") as f:
        f.write("\n" + text + "\n")


if __name__ == "__main__":
    app.run(main)
