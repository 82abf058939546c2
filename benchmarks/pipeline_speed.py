"""Throughput of the fill-mask and text-classification pipelines, and their compile count.

  python benchmarks/pipeline_speed.py --mlm=/tmp/wikitext2-mlm --classifier=/tmp/sst2 \
      [--requests=1000] [--seconds=10]

Sentences per second of each pipeline called with 1 text and with 32 texts per call (programs
compiled beforehand; the median of calls over about --seconds), then --requests calls of
mixed sizes (1-32 texts of 1-40 words, fill-mask and classification alternating) with the
number of programs compiled against the number of distinct shapes an unbucketed pipeline
would compile. Printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from provenance import machine

from tfjax import cli, pipelines

_MLM = flags.DEFINE_string("mlm", None, "a masked_lm workdir", required=True)
_CLASSIFIER = flags.DEFINE_string("classifier", None, "a classification workdir", required=True)
_REQUESTS = flags.DEFINE_integer("requests", 1000, "mixed requests for the compile count")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "time spent per throughput figure")
WORDS = (
    "the a film movie was is and of plot cast great dull man woman street riding story "
    "music good bad not very funny long"
).split()
RESULTS = Path(__file__).with_name("RESULTS.md")


def _texts(rng: np.random.Generator, n: int, mask: bool) -> list[str]:
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(1, 41)))
        if mask:
            words[rng.integers(len(words))] = "<mask>"
        out.append(" ".join(words))
    return out


def _throughput(pipe, texts: list[str]) -> float:
    """Sentences per second: the median call over about _SECONDS seconds."""
    pipe(texts)  # compile
    times = []
    deadline = time.perf_counter() + _SECONDS.value
    while time.perf_counter() < deadline or len(times) < 3:
        tick = time.perf_counter()
        pipe(texts)
        times.append(time.perf_counter() - tick)
    return len(texts) / float(np.median(times))


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    fill = pipelines.pipeline("fill-mask", _MLM.value, batch_size=32)
    classify = pipelines.pipeline("text-classification", _CLASSIFIER.value, batch_size=32)
    rng = np.random.default_rng(0)
    rows = []
    for name, pipe, mask in (("fill-mask", fill, True), ("text-classification", classify, False)):
        for batch in (1, 32):
            rows.append(
                (f"{name}, {batch} text(s) per call", _throughput(pipe, _texts(rng, batch, mask)))
            )
    jitted = [
        pipelines._mask_probabilities(fill.model),
        pipelines._class_probabilities(classify.model),
    ]
    before = sum(f._cache_size() for f in jitted)
    shapes = set()
    for i in range(_REQUESTS.value):
        mask = i % 2 == 0
        texts = _texts(rng, int(rng.integers(1, 33)), mask)
        (fill if mask else classify)(texts)
        longest = max(len(ids) + 1 for ids in fill.tokenizer.encode_batch(texts))
        shapes.add((mask, len(texts), min(longest, fill.max_len)))
    compiled = sum(f._cache_size() for f in jitted) - before
    lines = [
        f"### pipelines: throughput and compile count ({datetime.date.today()})",
        f"machine: {machine()}, {jax.device_count()} cpu device(s); "
        f"versions: jax {jax.__version__}",
        "",
        "| workload | sentences/s |",
        "|---|---|",
        *(f"| {name} | {speed:.1f} |" for name, speed in rows),
        "",
        "| workload | programs compiled | reference: unbucketed shapes | ratio |",
        "|---|---|---|---|",
        f"| {_REQUESTS.value} mixed requests | {compiled} | {len(shapes)} | "
        f"{compiled / len(shapes):.3f} |",
    ]
    print("\n".join(lines))
    with RESULTS.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
