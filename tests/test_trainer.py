"""train.py end to end on a tiny corpus: exact resume after SIGKILL, SIGTERM, bad input."""

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    ROOT,
    STEPS,
    corrupt_latest,
    local_processes,
    train_command,
    train_losses,
)

from tfjax import checkpoint
from tfjax.model import Transformer


def _start(command: list[str]) -> subprocess.Popen:
    """A training run whose log (stderr) the test reads line by line."""
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _run_until(command: list[str], log_line: str, sig: int) -> tuple[subprocess.Popen, str]:
    """Start `command`, send `sig` once its log shows `log_line`; return it and its later log.

    The run is given far more steps than it can take before the signal lands, so the signal
    always arrives mid-training.
    """
    process = _start(command)
    for line in process.stderr:  # blocks on the child's log: no timing guesses
        if log_line in line:
            process.send_signal(sig)
            break
    rest = process.stderr.read()
    process.wait()
    return process, rest


def test_uninterrupted_run_writes_everything(uninterrupted):
    losses = train_losses(uninterrupted)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert (uninterrupted / "spm.model").exists()
    assert list((uninterrupted / "tensorboard").iterdir())
    config, params, tokenizer, meta = checkpoint.restore_for_inference(uninterrupted)
    assert meta["train"]["num_train_steps"] == STEPS
    assert tokenizer == (uninterrupted / "spm.model").read_bytes()
    # The restored parameters fit the saved config's model on this single CPU device.
    model = Transformer(config)
    src = np.full((1, 5), 5, np.int32)
    logits = model.apply({"params": params}, src, src)
    assert logits.shape == (1, 5, config.vocab_size) and np.isfinite(logits).all()


WRITE_METRICS = """
import sys
from etils import epath
from tfjax import trainer
writer = trainer.MetricWriter(epath.Path(sys.argv[1]))
writer.write(7, "train", {"loss": 1.5, "note": "not a number"})
writer.close()
print("torch" in sys.modules)
"""


def test_metrics_reach_tensorboard_without_importing_torch(tmp_path):
    """torch is installed here (the interop extra); the writer must not pay for importing it.
    The event file is read back record by record with tensorboardX's own Event protobuf."""
    out = subprocess.run(
        [sys.executable, "-c", WRITE_METRICS, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False"]
    from tensorboardX.proto.event_pb2 import Event

    (events,) = (tmp_path / "tensorboard").iterdir()
    data, records = events.read_bytes(), []
    while data:  # [length u64][crc u32][record][crc u32]
        (length,) = struct.unpack("<Q", data[:8])
        records.append(Event.FromString(data[12 : 12 + length]))
        data = data[16 + length :]
    scalars = [(r.step, v.tag, v.simple_value) for r in records for v in r.summary.value]
    assert scalars == [(7, "train/loss", 1.5)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == dict(
        step=7, split="train", loss=1.5
    )


def test_resume_after_sigkill_is_bit_identical(corpus, uninterrupted, tmp_path):
    """Kill a run once it starts saving step 20 (step 10 is committed by then); resume matches,
    though spm.model was damaged in between: the checkpoints' own tokenizer replaces it."""
    workdir = tmp_path / "killed"
    process, _ = _run_until(
        train_command(workdir, corpus, steps=1000), "Checkpoint 20: saving", signal.SIGKILL
    )
    assert process.returncode == -signal.SIGKILL
    resumed_from = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    # Step 20's save may or may not have been committed when the kill landed.
    assert resumed_from is not None and 10 <= resumed_from < STEPS
    (workdir / "metrics.jsonl").unlink()  # keep only what the restarted run logs
    (workdir / "spm.model").write_bytes(b"damaged")
    out = subprocess.run(train_command(workdir, corpus), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "spm.model differs from the checkpoints' tokenizer" in out.stderr
    assert (workdir / "spm.model").read_bytes() == checkpoint.restore_for_inference(workdir)[2]
    restarted, reference = train_losses(workdir), train_losses(uninterrupted)
    assert sorted(restarted) == list(range(resumed_from + 1, STEPS + 1))
    for step, loss in restarted.items():
        assert loss == reference[step], (step, loss, reference[step])  # bit-identical


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_save_before_exit(corpus, tmp_path, signum):
    workdir = tmp_path / "preempted"
    process, rest = _run_until(
        train_command(workdir, corpus, steps=1000), "Checkpoint 10: saving", signum
    )
    assert process.returncode == 0, rest[-3000:]
    step = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    assert step is not None and 10 <= step < 1000
    assert f"Saved step {step} after {signum.name}" in rest


def test_a_kill_during_a_checkpoint_write_never_restores_the_partial_step(
    corpus, uninterrupted, tmp_path
):
    """Freeze the run (SIGSTOP) as soon as it logs a save; if the save is still being written
    (Orbax's unfinalised `<step>.orbax-checkpoint-tmp-*` directory is on disk), SIGKILL it
    there, else let it go on to the next save. The partial step is never restored: the rerun
    starts from the last complete checkpoint and its losses are bit-identical."""
    workdir = tmp_path / "killed_while_saving"
    command = train_command(workdir, corpus, "--config.checkpoint_every=5", steps=1000)
    process = _start(command)
    partial = []
    for line in process.stderr:
        saving = re.search(r"Checkpoint (\d+): saving", line)
        if not saving:
            continue
        process.send_signal(signal.SIGSTOP)
        partial = [p.name for p in (workdir / "checkpoints").iterdir() if "-tmp" in p.name]
        if partial or int(saving.group(1)) >= STEPS - 5:
            break
        process.send_signal(signal.SIGCONT)
    process.kill()
    process.wait()
    assert partial, "no save was caught mid-write"
    partial_step = int(partial[0].split(".")[0])
    resumed_from = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    assert resumed_from == (partial_step - 5 or None), (partial, resumed_from)
    (workdir / "metrics.jsonl").unlink()
    out = subprocess.run(train_command(workdir, corpus), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    restarted, reference = train_losses(workdir), train_losses(uninterrupted)
    assert sorted(restarted) == list(range((resumed_from or 0) + 1, STEPS + 1))
    for step, loss in restarted.items():
        assert loss == reference[step], (step, loss, reference[step])


def test_sigterm_saves_within_a_few_steps_however_slow_they_are(corpus, tmp_path):
    """Steps of a wider model, no metrics fetch for 1,000 steps: the loop must not run ahead
    of the device, or the save would wait behind every step queued before the SIGTERM. The
    save ends within 10 step times (measured from this run's own progress) of the signal."""
    workdir = tmp_path / "slow"
    wide = ["--config.model.d_model=256", "--config.model.d_ff=1024", "--config.batch_size=32"]
    quiet = ["--config.log_every=1000", "--config.checkpoint_every=1000"]
    command = train_command(workdir, corpus, *wide, *quiet, steps=1000)
    process = _start(command)
    marks = {}  # steps dispatched -> when the progress bar showed them
    for line in process.stderr:  # the bar's carriage returns read as line ends
        shown = re.search(r"train:.*\|\s*(\d+)/1000", line)
        if shown and int(shown.group(1)) >= 5:
            marks[int(shown.group(1))] = time.monotonic()
        if marks and max(marks) >= 25:
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            break
    first, last = min(marks), max(marks)
    seconds_per_step = (marks[last] - marks[first]) / (last - first)
    rest = ""
    for line in process.stderr:
        rest += line
        if "after SIGTERM" in line:
            saved = time.monotonic()
            break
    process.wait()
    assert process.returncode == 0, rest[-3000:]
    assert saved - signalled < 10 * seconds_per_step, (saved - signalled, seconds_per_step)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.no_such_key=1"], "no_such_key"),
        (["--config.batch_size=eight"], "batch_size"),
        (["--config.data_dir=/nonexistent/corpus"], "/nonexistent/corpus"),
        (["--config.data_dir="], "needs --config.data_dir"),
        (["--config.test_split=tset"], "'test_split': 'tset'"),
    ],
)
def test_bad_input_is_refused_clearly(corpus, tmp_path, extra, message):
    out = subprocess.run(
        train_command(tmp_path / "w", corpus, *extra), capture_output=True, text=True
    )
    assert out.returncode != 0 and message in out.stderr


def test_unwritable_workdir_is_refused(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = subprocess.run(train_command(blocker / "w", corpus), capture_output=True, text=True)
    assert out.returncode != 0 and "not writable" in out.stderr


def test_resuming_a_different_model_is_refused(corpus, uninterrupted, tmp_path):
    out = subprocess.run(
        train_command(uninterrupted, corpus, "--config.model.d_model=48"),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "different model" in out.stderr
    assert "d_model" in out.stderr


def test_corrupt_checkpoint_is_reported(uninterrupted, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(uninterrupted, broken)
    step_dir = broken / "checkpoints" / str(STEPS) / "state"
    for f in step_dir.rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=str(STEPS)):
        checkpoint.restore_for_inference(broken)


def test_an_older_data_position_resumes_the_weights_and_test_split_empty_skips_the_test(
    corpus, uninterrupted, tmp_path
):
    """One resumed run checks two things: a data position written by the input pipeline of
    earlier versions, and `test_split=""` (no end-of-run test pass)."""
    old = tmp_path / "old"
    shutil.copytree(uninterrupted, old)
    (position,) = (old / "checkpoints" / str(STEPS) / "data").glob("*.json")
    # What versions before the packing stage saved (grain's FlatMap iterator state).
    position.write_text(json.dumps({"parent": {"next_index": 3}, "next_index_in_buffer": 5}))
    out = subprocess.run(
        train_command(old, corpus, "--config.test_split=", steps=STEPS + 10),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the weights resume, the data starts a new epoch" in out.stderr
    assert f"Resumed from step {STEPS}" in out.stderr
    assert max(train_losses(old)) == STEPS + 10
    assert "No test pass" in out.stderr and "exact match" not in out.stdout


def test_a_corrupt_latest_checkpoint_is_named_with_the_way_back(corpus, uninterrupted, tmp_path):
    """A resume whose newest checkpoint cannot be read stops with one line saying which step
    to fall back to, and no traceback, and leaves the checkpoints as they were."""
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    steps = corrupt_latest(workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    out = subprocess.run(
        train_command(workdir, corpus, steps=STEPS + 10), capture_output=True, text=True
    )
    assert out.returncode != 0, out.stderr[-3000:]
    # The reads still in flight when one failed do not report between its lines.
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: checkpoint {workdir}/checkpoints/{steps[-1]}: ")
    assert f"resume from step {steps[-2]}, move {workdir}/checkpoints/{steps[-1]} aside" in line
    assert "tensorstore_spec" not in line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="training workdir"):
        checkpoint.restore_for_inference(tmp_path)
    assert jax.devices()  # the error path needs no device work


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    workdir = tmp_path / "diverged"
    # An absurd learning rate overflows the parameters within a few steps.
    out = subprocess.run(
        train_command(
            workdir, corpus, "--config.learning_rate=1e30", "--config.checkpoint_every=1"
        ),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    found = re.search(r"loss is (nan|inf) at step (\d+)", out.stderr)
    assert found, out.stderr[-2000:]
    bad = int(found.group(2))
    assert all(np.isfinite(loss) for loss in train_losses(workdir).values())
    saved = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    assert saved is None or saved < bad  # the diverged state was never saved


def test_two_process_evaluation_equals_one_process(uninterrupted):
    """Eval rows are split over the processes and placed on the mesh, as the trainer does;
    loss and BLEU come out global, the same on every process and as in one process."""
    *two, one = local_processes(ROOT / "tests" / "multi_process_eval.py", str(uninterrupted))
    assert [r["process"] for r in two] == [0, 1] and one["process"] == 0
    for beam in ("beam1", "beam2"):
        for result in two:  # every process computes the same scores
            for key in ("bleu", "chrf", "exact_match", "bleu_lowercase"):
                assert result[beam][key] == one[beam][key], (beam, key)
            for key in ("nll", "accuracy"):  # sums regrouped over processes: float rounding
                np.testing.assert_allclose(result[beam][key], one[beam][key], rtol=1e-6)
        assert one[beam]["bleu"] > 0 and one[beam]["chrf"] > 0  # not equal by being empty
