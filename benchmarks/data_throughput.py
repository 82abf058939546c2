"""Input-pipeline throughput against what the small model's train step consumes.

  python benchmarks/data_throughput.py [--corpus=/path/to/multi30k --corpus_pair=de-en]

Figure: target tokens (non-pad) per second out of `train_dataset`, one process, batches of
64 x 32 as the trainer would take them. Reference: the target tokens per second the train step
consumes, i.e. steps per second of jitted `jax.value_and_grad` of cross-entropy on the logits of
a Transformer (d_model 256, 3+3 layers, 4 heads, d_ff 1024, vocab 8000) on 64 x 32 batches,
times the non-pad target tokens in one of that workload's batches. Ratio = figure / reference
(= pipeline batches/s over train steps/s); the aim is >= 10. --consumption_tokens_per_s sets the
reference by hand (e.g. a measured accelerator step) and skips timing the model.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
import tensorflow_datasets as tfds
from absl import app, flags
from tabulate import tabulate

from tfjax import data
from tfjax.model import Transformer, TransformerConfig

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "Where datasets and tokenizers are built (default: a temp dir)."
)
flags.DEFINE_string("corpus", None, "Optional folder of line-aligned text files to time as well.")
flags.DEFINE_string("corpus_pair", "de-en", "The corpus' source-target languages.")
flags.DEFINE_integer("vocab_size", 8000, "Tokenizer vocabulary size (an upper bound).")
flags.DEFINE_integer("batch_size", 64, "Rows per batch.")
flags.DEFINE_integer("max_len", 32, "Tokens per source row and per target row.")
flags.DEFINE_integer("batches", 300, "Batches timed per workload (after 10 of warm-up).")
flags.DEFINE_integer("steps", 5, "Train steps timed for the reference (after one compiling).")
flags.DEFINE_float(
    "consumption_tokens_per_s", None, "Reference batches/s x tokens, set by hand: skips the model."
)


def time_pipeline(source, tokenizer, pack: bool) -> tuple[float, float]:
    """(batches per second, mean non-pad target tokens per batch) of the training pipeline."""
    options = data.PipelineOptions(
        batch_size=FLAGS.batch_size,
        max_source_len=FLAGS.max_len,
        max_target_len=FLAGS.max_len,
        pack=pack,
        process_index=0,
        process_count=1,
    )
    iterator = iter(data.train_dataset(source, tokenizer, options))
    for _ in range(10):
        next(iterator)
    tokens = 0
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        tokens += int(np.count_nonzero(next(iterator)["targets"]))
    seconds = time.perf_counter() - start
    return FLAGS.batches / seconds, tokens / FLAGS.batches


def time_train_step() -> float:
    """Train steps per second of the reference model on one batch_size x max_len batch."""
    config = TransformerConfig(
        vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_layers=3, dropout_rate=0.0
    )
    model = Transformer(config)
    shape = (FLAGS.batch_size, FLAGS.max_len)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(4, 8000, shape, np.int32) for k in ("inputs", "decoder_inputs")}
    batch["targets"] = rng.integers(4, 8000, shape, np.int32)
    params = model.init(jax.random.key(0), batch["inputs"], batch["decoder_inputs"])

    def loss(params, batch):
        logits = model.apply(params, batch["inputs"], batch["decoder_inputs"])  # [B, T, V]
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probs, batch["targets"][..., None], -1).mean()

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, batch))  # compile
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        result = step(params, batch)
    jax.block_until_ready(result)
    return FLAGS.steps / (time.perf_counter() - start)


def workloads(workdir: str):
    """(name, train source, tokenizer) for the synthetic task and the optional corpus."""
    tfds_dir = os.path.join(workdir, "tfds")
    specs = [("synthetic en-de", data.SYNTHETIC, "en", "de")]
    if FLAGS.corpus:
        source_lang, target_lang = FLAGS.corpus_pair.split("-")
        name = f"{os.path.basename(os.path.normpath(FLAGS.corpus))} {FLAGS.corpus_pair}"
        specs.append((name, FLAGS.corpus, source_lang, target_lang))
    for name, dataset, source_lang, target_lang in specs:
        built = data.prepare(
            dataset, source_lang=source_lang, target_lang=target_lang, data_dir=tfds_dir
        )
        source = built.source("train")
        model_path = os.path.join(workdir, name.replace(" ", "_") + ".spm.model")
        tokenizer = data.load_or_train_tokenizer(model_path, source, vocab_size=FLAGS.vocab_size)
        yield name, source, tokenizer


def main(argv: list[str]) -> None:
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="data_throughput_")
    steps_per_s = None if FLAGS.consumption_tokens_per_s else time_train_step()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}"
    versions = (
        f"jax {jax.__version__}, grain {grain.__version__}, tfds {tfds.__version__}, "
        f"sentencepiece {sentencepiece.__version__}"
    )
    rows = []
    for name, source, tokenizer in workloads(workdir):
        for pack in (True, False):
            batches_per_s, tokens_per_batch = time_pipeline(source, tokenizer, pack)
            figure = batches_per_s * tokens_per_batch
            reference = FLAGS.consumption_tokens_per_s or steps_per_s * tokens_per_batch
            workload = f"{name}, {'packed' if pack else 'padded'}"
            rows.append(
                [workload, f"{figure:,.0f}", f"{reference:,.0f}", f"{figure / reference:.1f}x"]
                + [machine, versions]
            )
    headers = ["workload", "target tokens/s", "train step consumes", "ratio", "machine", "versions"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nbatch {FLAGS.batch_size} x {FLAGS.max_len}; load average during the run: {load}")


if __name__ == "__main__":
    app.run(main)
