"""train.py end to end on a tiny corpus: exact resume after SIGKILL, SIGTERM, bad input."""

import re
import signal
import subprocess

import jax
import numpy as np
import pytest
from conftest import STEPS, train_command, train_losses

from tfjax import checkpoint
from tfjax.model import Transformer


def _run_until(command: list[str], log_line: str, sig: int) -> tuple[subprocess.Popen, str]:
    """Start `command`, send `sig` once its log shows `log_line`; return it and its later log.

    The run is given far more steps than it can take before the signal lands, so the signal
    always arrives mid-training.
    """
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
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


def test_resume_after_sigkill_is_bit_identical(corpus, uninterrupted, tmp_path):
    """Kill a run once it starts saving step 20 (step 10 is committed by then); resume matches."""
    workdir = tmp_path / "killed"
    process, _ = _run_until(
        train_command(workdir, corpus, steps=1000), "Checkpoint 20: saving", signal.SIGKILL
    )
    assert process.returncode == -signal.SIGKILL
    resumed_from = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    # Step 20's save may or may not have been committed when the kill landed.
    assert resumed_from is not None and 10 <= resumed_from < STEPS
    (workdir / "metrics.jsonl").unlink()  # keep only what the restarted run logs
    out = subprocess.run(train_command(workdir, corpus), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    restarted, reference = train_losses(workdir), train_losses(uninterrupted)
    assert sorted(restarted) == list(range(resumed_from + 1, STEPS + 1))
    for step, loss in restarted.items():
        assert loss == reference[step], (step, loss, reference[step])  # bit-identical


def test_sigterm_saves_before_exit(corpus, tmp_path):
    workdir = tmp_path / "preempted"
    process, rest = _run_until(
        train_command(workdir, corpus, steps=1000), "Checkpoint 10: saving", signal.SIGTERM
    )
    assert process.returncode == 0, rest[-3000:]
    step = checkpoint.Checkpointer(workdir, async_saves=False).latest_step()
    assert step is not None and 10 <= step < 1000
    assert f"Saved step {step} after SIGTERM" in rest


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.no_such_key=1"], "no_such_key"),
        (["--config.batch_size=eight"], "batch_size"),
        (["--config.data_dir=/nonexistent/corpus"], "/nonexistent/corpus"),
        (["--config.data_dir="], "needs --config.data_dir"),
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
