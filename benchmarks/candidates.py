"""The checkpoints a quality benchmark weighs on validation: the last, the best, averages."""

from __future__ import annotations

from typing import Any

from etils import epath

from tfjax import checkpoint


def candidates(
    workdir: str, averages: list[int], step: int | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (workdir, `Translator.from_workdir` keyword arguments).

    "last" is `step` (default: the latest checkpoint); "best" the best-by-validation one when
    it is another step; "average-K" the mean of the last K checkpoints, written beside the
    workdir to <workdir>-average-K (an average may not be written inside its source) unless
    that folder already holds the average ending at the workdir's latest step.
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "last": (workdir, {} if step is None else {"step": step})
    }
    if (epath.Path(workdir) / "best").exists():
        if saved_step(workdir, best=True) != (step or saved_step(workdir, best=False)):
            out["best"] = (workdir, {"best": True})
        else:
            print("best: the last checkpoint")
    for k in averages:
        target = f"{str(workdir).rstrip('/')}-average-{k}"
        done = (epath.Path(target) / "checkpoints").exists()
        if not done or saved_step(target, best=False) != saved_step(workdir, best=False):
            try:
                steps = checkpoint.average_checkpoints(workdir, target, k)
            except checkpoint.CheckpointError as e:
                print(f"average-{k}: skipped ({e})")
                continue
            print(f"average-{k}: steps {steps}")
        out[f"average-{k}"] = (target, {})
    return out


def saved_step(workdir: str, *, best: bool) -> int:
    """The step of a candidate: its best or its latest checkpoint's."""
    return checkpoint.best_step(workdir) if best else checkpoint.latest_step(workdir)
