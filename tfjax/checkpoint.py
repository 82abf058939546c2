"""Orbax checkpoints: async periodic saves, the best by validation BLEU, exact resume, restore.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds, written together:
  state/      the TrainState (parameters, optimizer state, step), sharded as in training;
  data/       each process's data-iterator state (grain), so a resume sees the same batches;
  meta/       JSON: the model config and the training config;
  assets/     the sentencepiece model's bytes, so a checkpoint translates on its own.
`<workdir>/best/<step>/` keeps the one checkpoint with the highest validation BLEU.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tfjax.model import TransformerConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or does not fit the model asked for."""


def config_to_json(cfg: TransformerConfig) -> dict[str, Any]:
    """A TransformerConfig as JSON-able values (dtypes by name)."""
    return {
        k: (np.dtype(v).name if k in ("dtype", "param_dtype") else v)
        for k, v in dataclasses.asdict(cfg).items()
    }


def config_from_json(values: dict[str, Any]) -> TransformerConfig:
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(values) - known
    if unknown:
        raise CheckpointError(f"checkpoint names unknown model config fields {sorted(unknown)}")
    values = dict(values)
    for k in ("dtype", "param_dtype"):
        if k in values:
            values[k] = jax.numpy.dtype(values[k])
    return TransformerConfig(**values)


def _best_score(metrics: dict[str, float]) -> float:
    # Workdirs written before encoder-only tasks saved their score as "bleu".
    return metrics["score"] if "score" in metrics else metrics["bleu"]


class Checkpointer:
    """The workdir's checkpoint managers: the last `keep` saves, and the best by the task's score
    (BLEU for translation, accuracy for encoder-only tasks)."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_saves: bool = True) -> None:
        root = epath.Path(workdir)  # local paths and gs:// alike
        options = dict(enable_async_checkpointing=async_saves, create=True)
        self.latest = ocp.CheckpointManager(
            root / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options)
        )
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=_best_score, best_mode="max", **options
            ),
        )

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        meta: dict[str, Any],
        tokenizer_bytes: bytes,
        *,
        score: float | None = None,
    ) -> None:
        """Start saving (async); with `score`, also offer the checkpoint to the best-of manager."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
            assets=ocp.args.StandardSave({"tokenizer": np.frombuffer(tokenizer_bytes, np.uint8)}),
        )
        self.latest.save(step, args=args, force=True)
        if score is not None:
            self.best.save(step, args=args, metrics={"score": float(score)}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, target_state: Any, data_iterator: Any, step: int | None = None) -> Any:
        """Restore state into the shardings of `target_state` and the iterator in place
        (None: the state alone).

        `target_state` is a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, so a
        checkpoint written on one mesh restores onto another.
        """
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.latest.directory}")
        items = dict(state=ocp.args.StandardRestore(target_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        _quiet_orphaned_reads()
        try:
            restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, FileNotFoundError, OSError, KeyError) as e:
            path, earlier = self.latest.directory / str(step), self.latest.all_steps()[:-1]
            hint = f"; to resume from step {earlier[-1]}, move {path} aside" if earlier else ""
            raise CheckpointError(f"checkpoint {path}: {_reason(e)}{hint}") from e
        return restored.state

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _reason(error: Exception) -> str:
    """An Orbax/TensorStore error's message without the store's JSON spec, and a KeyError's
    without its quotes."""
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        return error.args[0]
    return str(error).split(" [tensorstore_spec")[0]


def _quiet_orphaned_reads() -> None:
    """Drop the reports of a failed restore's orphaned reads (called before each restore).

    When one read of a checkpoint fails, Orbax closes its event loop while TensorStore still
    has the others in flight; each of those then lands on the closed loop and Python prints
    "RuntimeError: Event loop is closed" through `sys.unraisablehook`, from TensorStore's
    threads, in pieces between the lines of the error the user should read. The hook keeps
    every other report.
    """
    previous = sys.unraisablehook
    if getattr(previous, "quiets_orphaned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_orphaned_reads = True
    sys.unraisablehook = hook


def _unreadable(directory: epath.Path, step: int, error: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory / str(step)} is unreadable: {_reason(error)}")


def _step_dir(directory: epath.Path, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    if not directory.exists():
        # best/ is missing from a workdir that has checkpoints/ when no evaluation ran.
        workdir = directory.parent
        hint = "" if (workdir / "checkpoints").exists() else f"; is {workdir} a training workdir?"
        raise CheckpointError(f"{directory} does not exist{hint}")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=dict(
            state=ocp.PyTreeCheckpointHandler(),
            meta=ocp.JsonCheckpointHandler(),
            assets=ocp.StandardCheckpointHandler(),
            data=grain.checkpoint.CheckpointHandler(),
        ),
    )
    found = manager.all_steps()
    if not found:
        raise CheckpointError(f"no checkpoint in {directory}")
    step = manager.latest_step() if step is None else step
    if step not in found:
        raise CheckpointError(f"no checkpoint step {step} in {directory} (found {found})")
    return manager, step


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether `workdir` holds a finished training checkpoint: one a resume would restore."""
    try:
        _step_dir(epath.Path(workdir) / "checkpoints", None)
    except CheckpointError:
        return False
    return True


def best_step(workdir: str | Path) -> int:
    """The step of the checkpoint `best/` holds (the best on the evaluation split)."""
    return _step_dir(epath.Path(workdir) / "best", None)[1]


def latest_step(workdir: str | Path) -> int:
    """The step of the newest checkpoint in `checkpoints/`."""
    return _step_dir(epath.Path(workdir) / "checkpoints", None)[1]


def read_meta(workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON meta (model and training config) saved with a checkpoint of `workdir`."""
    return _read_item(workdir, step, meta=ocp.args.JsonRestore()).meta


def read_tokenizer(workdir: str | Path, step: int | None = None) -> bytes:
    """The sentencepiece model saved with a checkpoint of `workdir` (the latest: None)."""
    assets = _read_item(workdir, step, assets=ocp.args.StandardRestore()).assets
    return np.asarray(assets["tokenizer"]).tobytes()


def _read_item(workdir: str | Path, step: int | None, **item: Any) -> Any:
    """One small item (meta, assets) of a checkpoint of `workdir`, without its state."""
    directory = epath.Path(workdir) / "checkpoints"
    manager, step = _step_dir(directory, step)
    _quiet_orphaned_reads()
    try:
        return manager.restore(step, args=ocp.args.Composite(**item))
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        raise _unreadable(directory, step, e) from e


def restore_for_inference(
    workdir: str | Path, step: int | None = None, *, best: bool = False
) -> tuple[TransformerConfig, Any, bytes, dict[str, Any]]:
    """(model config, params on the default device, tokenizer bytes, meta) of a checkpoint.

    Restores onto whatever devices this process has (e.g. one CPU), whatever mesh wrote it.
    """
    directory = epath.Path(workdir) / ("best" if best else "checkpoints")
    manager, step = _step_dir(directory, step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    _quiet_orphaned_reads()
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        tree = manager.item_metadata(step).state.tree
        # Only the parameters: evaluation needs neither the optimizer state nor the step.
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"]
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args=jax.tree_util.tree_map(
                        lambda t: ocp.ArrayRestoreArgs(sharding=device), {"params": target}
                    ),
                    partial_restore=True,
                ),
                assets=ocp.args.StandardRestore(),
            ),
        )
    except (ValueError, FileNotFoundError, OSError, KeyError, AttributeError) as e:
        raise _unreadable(directory, step, e) from e
    config = config_from_json(meta["model"])
    tokenizer = np.asarray(restored.assets["tokenizer"]).tobytes()
    return config, restored.state["params"], tokenizer, meta


def _resolved(path: str | Path) -> epath.Path:
    """`path` with `..` and symlinks resolved where it is local; a gs:// path as written."""
    # epath's resolve() neither follows symlinks nor leaves gs:// alone.
    return epath.Path(path if "://" in str(path) else os.path.realpath(path))


def _check_average_output(workdir: str | Path, output: str | Path, step: int) -> epath.Path:
    """`<output>/checkpoints`, refusing the source workdir, a folder in it, or an output whose
    checkpoints reach `step` (Orbax would skip the save without a word)."""
    source, target = _resolved(workdir), _resolved(output)
    if target == source or target.is_relative_to(source):
        where = "is" if target == source else "is inside"
        raise CheckpointError(f"output {output} {where} the source workdir {workdir}")
    directory = target / "checkpoints"
    taken = (
        [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    )
    if taken and max(taken) >= step:
        raise CheckpointError(
            f"{directory} already holds step {max(taken)}; the average is step {step}: "
            "choose an output without checkpoints from that step on"
        )
    return directory


def average_checkpoints(workdir: str | Path, output: str | Path, last: int) -> list[int]:
    """Average the parameters of the last `last` checkpoints into `<output>/checkpoints/<step>`.

    As fairseq's checkpoint averaging: an element-wise mean of the parameters in float64, each
    rounded once to its saved dtype, written as a checkpoint (parameters, meta, tokenizer) that
    `restore_for_inference` and the Translator read like any other. `output` must be neither
    the source workdir nor inside it. Returns the averaged steps.
    """
    manager, _ = _step_dir(epath.Path(workdir) / "checkpoints", None)
    found = sorted(manager.all_steps())
    if not 1 <= last <= len(found):
        raise CheckpointError(
            f"asked to average {last} checkpoints; {workdir} has {len(found)} ({found}), so "
            f"last must be 1 to {len(found)}"
        )
    steps = found[-last:]
    directory = _check_average_output(workdir, output, steps[-1])
    total, config, dtypes = None, None, None
    for step in steps:
        cfg, params, tokenizer, meta = restore_for_inference(workdir, step)
        if config is not None and cfg != config:
            raise CheckpointError(f"checkpoint {step} has a different model config")
        config = cfg
        if dtypes is None:  # each leaf is written back in the dtype it was saved in
            dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)
        wide = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        total = wide if total is None else jax.tree_util.tree_map(np.add, total, wide)
    average = jax.tree_util.tree_map(lambda s, d: (s / len(steps)).astype(d), total, dtypes)
    writer = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    )
    saved = writer.save(
        steps[-1],
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": average}),
            meta=ocp.args.JsonSave({**meta, "averaged_steps": steps}),
            assets=ocp.args.StandardSave({"tokenizer": np.frombuffer(tokenizer, np.uint8)}),
        ),
    )
    writer.close()  # synchronous: the step is committed once save() returns
    if not saved or not (directory / str(steps[-1])).exists():
        raise CheckpointError(f"the average was not written to {directory / str(steps[-1])}")
    return steps
