"""Shared fixtures: a tiny parallel corpus and one short training run on it."""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfjax.data import BOS_ID

ROOT = Path(__file__).resolve().parents[1]
# The suite runs on CPU devices; with libtpu installed (the "tpu" extra) JAX would otherwise
# probe for a TPU in this process and every subprocess. TPU compiles use topology descriptions.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def env_with_xla_flag(flag: str) -> dict[str, str]:
    """os.environ with `flag` appended to XLA_FLAGS (the last one named wins), so the suite's
    own flags, and e.g. --xla_cpu_max_isa=AVX2 from whoever runs it, stay."""
    return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())


# LLVM at -O0 behind XLA:CPU: the suite compiles hundreds of tiny programs whose run time is
# nothing, and LLVM's optimisation was about a third of each compile (the 8-device test's
# train step: 23 s -> 15 s a mesh on an AVX2 VM). XLA's own passes, and so every program's
# HLO and semantics, are unchanged; only the machine code is less tuned.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = env_with_xla_flag("--xla_backend_optimization_level=0")["XLA_FLAGS"]
# One persistent compilation cache for the session, made by the process pytest starts: its
# pytest-xdist workers and every subprocess they start inherit the environment. The suite's
# many short training and CLI runs compile the same tiny steps again and again.
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
_CACHE_SETTINGS = {  # every compile is cached, however quick or small
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}
if not _XDIST_WORKER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfjax-tests-xla-cache-")
    os.environ["TFJAX_TESTS_SHARED"] = tempfile.mkdtemp(prefix="tfjax-tests-shared-")
    os.environ.update({name.upper(): str(value) for name, value in _CACHE_SETTINGS.items()})
STEPS = 80
# A model small enough that a step costs milliseconds; every checkpoint-relevant path runs.
TINY = [
    "--config.vocab_size=320",  # byte fallback takes 256 ids
    "--config.max_source_len=24",
    "--config.max_target_len=24",
    "--config.batch_size=16",
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.model.num_heads=2",
    "--config.model.num_layers=1",
    "--config.warmup_steps=4",
    "--config.log_every=1",
    "--config.checkpoint_every=10",
    "--config.eval_every=100",
    "--config.eval_decode_sentences=8",
    "--config.eval_batch_size=8",
    "--config.eval_split=val",
]

WORDS = "ein mann fährt fahrrad eine frau liest ein buch zwei kinder spielen im park".split()
ENGLISH = "a man rides bike a woman reads a book two children play in park".split()


@pytest.fixture(scope="session")
def corpus() -> Path:
    """A tiny de-en folder corpus: train / val / test, word-for-word pairs."""

    def write(folder: Path) -> None:
        rng = np.random.default_rng(0)
        for split, n in (("train", 400), ("val", 16), ("test", 16)):
            rows = [rng.choice(len(WORDS), size=rng.integers(2, 7)) for _ in range(n)]
            (folder / f"{split}.de").write_text(
                "".join(" ".join(WORDS[i] for i in r) + "\n" for r in rows)
            )
            (folder / f"{split}.en").write_text(
                "".join(" ".join(ENGLISH[i] for i in r) + "\n" for r in rows)
            )

    return made_once("corpus", write)


def train_command(workdir: Path, corpus: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/default.py"),
        f"--workdir={workdir}", "--config.dataset=folder", "--config.source_lang=de",
        "--config.target_lang=en", f"--config.data_dir={corpus}",
        f"--config.num_train_steps={steps}", "--config.test_split=test", *TINY, *extra,
    ]  # fmt: skip


def train_losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def corrupt_latest(workdir: Path) -> list[int]:
    """Truncate the array files of workdir's newest checkpoint; its checkpoint steps, sorted."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for data in (workdir / "checkpoints" / str(steps[-1]) / "state" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:100])
    return steps


@pytest.fixture(scope="session")
def uninterrupted(corpus) -> Path:
    def train(workdir: Path) -> None:
        out = subprocess.run(train_command(workdir, corpus), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "exact match" in out.stdout

    return made_once("uninterrupted", train)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def local_processes(script: Path, *args: str, alone: bool = True) -> list[dict]:
    """Run `script PROCESS_ID COUNT PORT *args` as two processes of one jax.distributed job
    and, if `alone`, as one process by itself, all at once; the last JSON line of each
    stdout: [process 0's, process 1's] (+ [the single process's])."""

    def launch(process_id: int, count: int, port: int) -> subprocess.Popen:
        command = [sys.executable, str(script), str(process_id), str(count), str(port), *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = _free_port()
    processes = [launch(0, 2, port), launch(1, 2, port)]
    processes += [launch(0, 1, _free_port())] if alone else []
    outputs = [p.communicate() for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # The last JSON line: gloo writes its own lines to stdout too.
    return [json.loads([x for x in o.splitlines() if x.startswith("{")][-1]) for o, _ in outputs]


MULTI_DEVICE_TEST = "test_meshes_of_eight_devices_match_one_device"
_STARTED: dict[str, subprocess.Popen] = {}


def multi_device_run() -> subprocess.Popen:
    """tests/multi_device_steps.py on 8 simulated CPU devices (XLA_FLAGS appended to, so a run
    under e.g. --xla_cpu_max_isa=AVX2 keeps that flag); started at collection if selected."""
    if MULTI_DEVICE_TEST in _STARTED:
        return _STARTED.pop(MULTI_DEVICE_TEST)
    script = ROOT / "tests" / "multi_device_steps.py"
    return subprocess.Popen(
        [sys.executable, str(script)],
        env=env_with_xla_flag("--xla_force_host_platform_device_count=8"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pytest_configure(config) -> None:
    # jax reads its environment when imported, here before the lines above ran (tfjax.data).
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    for name, value in _CACHE_SETTINGS.items():
        jax.config.update(name, value)


def pytest_unconfigure(config) -> None:
    if not _XDIST_WORKER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
        shutil.rmtree(os.environ["TFJAX_TESTS_SHARED"], ignore_errors=True)


def made_once(name: str, make: Callable[[Path], Any]) -> Path:
    """A folder of the session's shared folder, filled by `make(folder)` in the first process
    that asks for it; pytest-xdist workers wait on its lock and reuse it, so the session's
    training runs happen once, not once per worker. A `make` that raises leaves it unmade."""
    root = Path(os.environ["TFJAX_TESTS_SHARED"])
    folder, done = root / name, root / f"{name}.done"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the lock file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def pytest_collection_finish(session) -> None:
    # The 8-device run is one process that mostly compiles, on one core: started now, it runs
    # beside the rest of the suite on the other core instead of after it. Under pytest-xdist,
    # where every worker collects every test and the cores are busy already, the test starts it.
    if _XDIST_WORKER:
        return
    if any(item.originalname == MULTI_DEVICE_TEST for item in session.items):
        _STARTED[MULTI_DEVICE_TEST] = multi_device_run()


POSITIVE = "good great fine lovely superb".split()
NEGATIVE = "bad awful poor dull terrible".split()
FILLER = "the film was and a plot cast music too".split()


@pytest.fixture(scope="session")
def task_folders() -> dict[str, Path]:
    """A sentiment TSV folder (label 1 iff the sentence has a POSITIVE word) and a plain
    text folder of the same vocabulary, for the encoder-only tasks."""

    def write(root: Path) -> None:
        rng = np.random.default_rng(0)

        def sentence(label: int) -> str:
            words = list(rng.choice(FILLER, size=rng.integers(2, 7)))
            words.insert(rng.integers(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            return " ".join(words)

        (root / "sentiment").mkdir()
        for split, n in (("train", 480), ("dev", 48), ("test", 48)):
            labels = rng.integers(0, 2, size=n)
            rows = "".join(f"{y}\t{sentence(y)}\n" for y in labels)
            (root / "sentiment" / f"{split}.tsv").write_text("label\tsentence\n" + rows)
        (root / "text").mkdir()
        for split, n in (("train", 600), ("test", 48)):
            lines = [sentence(int(y)) for y in rng.integers(0, 2, size=n)]
            (root / "text" / f"{split}.txt").write_text("\n\n".join(lines) + "\n")

    root = made_once("tasks", write)
    return {"sentiment": root / "sentiment", "text": root / "text"}


def train_in_process(workdir: Path, *overrides: str) -> dict:
    """trainer.train_and_evaluate on configs/default.py with TINY and `overrides`."""
    from tfjax import cli, trainer

    config = cli.load_config(str(ROOT / "configs/default.py"), [*TINY, *overrides])
    return trainer.train_and_evaluate(config, str(workdir))


ENCODER_TASK = ["--config.dataset=folder", "--config.num_train_steps=60", "--config.eval_every=60"]


@pytest.fixture(scope="session")
def mlm_workdir(task_folders) -> Path:
    def train(workdir: Path) -> None:
        train_in_process(
            workdir, *ENCODER_TASK, "--config.task=masked_lm", "--config.eval_split=test",
            f"--config.data_dir={task_folders['text']}", "--config.learning_rate=3e-3",
        )  # fmt: skip

    return made_once("mlm", train)


@pytest.fixture(scope="session")
def classifier_workdir(task_folders, mlm_workdir) -> Path:
    """A classifier started from mlm_workdir's encoder, with display label names."""

    def train(workdir: Path) -> None:
        train_in_process(
            workdir, *ENCODER_TASK, "--config.task=classification", "--config.pack=False",
            "--config.eval_split=dev", f"--config.data_dir={task_folders['sentiment']}",
            f"--config.init_from={mlm_workdir}", "--config.label_names=('NEGATIVE', 'POSITIVE')",
            "--config.learning_rate=3e-3",
        )  # fmt: skip

    return made_once("classifier", train)


# Candidates for the sentences whose greedy translation by the shared tiny run ends in eos:
# the others run on to max_decode_len, and their text, re-tokenized, is cut to fit its eos.
# Which ones do depends on the run's training, so the test picks them (`ending_in_eos`).
CANDIDATES = [
    "zwei kinder spielen im park", "eine frau liest", "ein buch", "ein mann fährt fahrrad",
    "eine frau", "zwei kinder", "ein mann liest ein buch", "kinder spielen", "im park",
]  # fmt: skip


def ending_in_eos(translator, count: int = 3) -> list[str]:
    """The first `count` candidates whose greedy translation ends in eos."""
    found = translator.translate(CANDIDATES)
    done = [s for s, t in zip(CANDIDATES, found, strict=True) if t.pieces[-1] == "</s>"]
    assert len(done) >= 2, [t.text for t in found]
    return done[:count]


def with_decoder_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """batch + decoder_inputs [B, T]: targets shifted right within each target segment (bos
    where a segment starts, 0 on padding; unpacked rows are one segment wherever targets are
    not pad), computed for the whole batch at once: a reference for the pipeline's."""
    targets = batch["targets"]  # [B, T]
    segments = batch.get("targets_segment_ids", (targets != 0).astype(np.int32))  # [B, T]
    decoder_inputs = np.zeros_like(targets)
    decoder_inputs[:, 1:] = targets[:, :-1]
    starts = np.ones_like(segments, dtype=bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    decoder_inputs[starts] = BOS_ID
    decoder_inputs[segments == 0] = 0
    return {**batch, "decoder_inputs": decoder_inputs}
