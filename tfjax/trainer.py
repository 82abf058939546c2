"""The training loop: data, mesh, state, restore, steps, evaluation, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from tfjax import checkpoint, evaluate, recipe, sharding, train_lib
from tfjax.data import (
    MASK_PIECE,
    PipelineOptions,
    PipelineStateError,
    TaskData,
    Tokenizer,
    TranslationData,
    load_or_train_tokenizer,
    tokenized_train_split,
    train_batch_shapes,
    train_dataset,
)
from tfjax.distill import Distillation
from tfjax.masking import Masking
from tfjax.model import Transformer
from tfjax.model.encoder_only import load_encoder

IN_FLIGHT = 2  # train steps dispatched and not yet waited for


class TrainingError(RuntimeError):
    """Training cannot start or go on: bad workdir, incompatible resume, NaN loss."""


def _adopt_tokenizer(workdir: epath.Path, tokenizer_bytes: bytes) -> None:
    """Make another workdir's tokenizer this one's spm.model, which the data pipeline then
    loads instead of training its own; kept if already there, as on a resumed run."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "spm.model").exists():
        (workdir / "spm.model").write_bytes(tokenizer_bytes)


def _keep_saved_tokenizer(workdir: epath.Path) -> None:
    """On a resume, make spm.model the tokenizer the checkpoints were trained with where it
    is missing or differs (a workdir copied without it, a damaged file): a tokenizer trained
    anew would give the saved model other pieces. Process 0 writes; the others wait for it."""
    if not checkpoint.has_checkpoint(workdir):
        return
    path = workdir / "spm.model"
    if jax.process_index() == 0:
        saved = checkpoint.read_tokenizer(workdir)
        if not (path.exists() and path.read_bytes() == saved):
            problem = "differs from" if path.exists() else "is missing beside"
            logging.warning("%s %s the checkpoints' tokenizer: written from them", path, problem)
            path.write_bytes(saved)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tfjax: spm.model")


def _restore_teacher(
    config: ml_collections.ConfigDict, workdir: epath.Path
) -> tuple[Distillation, Any] | None:
    """(Distillation, teacher params on the host) of config.distill, or None.

    The student must read the teacher's pieces, so it adopts the teacher's tokenizer.
    """
    values = config.distill
    if not values.teacher_workdir:
        return None
    teacher_cfg, params, tokenizer_bytes, _ = checkpoint.restore_for_inference(
        values.teacher_workdir
    )
    _adopt_tokenizer(workdir, tokenizer_bytes)
    distill = Distillation(Transformer(teacher_cfg), values.alpha, values.temperature)
    return distill, jax.device_get(params)


def _restore_encoder(config: ml_collections.ConfigDict, workdir: epath.Path) -> Any | None:
    """The params of config.init_from (a masked-LM workdir) on the host, or None.

    The new model must read the pieces its encoder was trained on, so it adopts that
    workdir's tokenizer. A resumed run has its weights and tokenizer already: it never reads
    init_from, which may have moved since.
    """
    if not config.get("init_from"):
        return None
    if checkpoint.has_checkpoint(workdir):
        logging.info("Resuming: init_from=%s is not read", config.init_from)
        return None
    cfg, params, tokenizer_bytes, meta = checkpoint.restore_for_inference(config.init_from)
    if recipe.task(ml_collections.ConfigDict(meta["train"])) != "masked_lm":
        raise TrainingError(f"init_from={config.init_from} is not a masked_lm workdir")
    _adopt_tokenizer(workdir, tokenizer_bytes)
    logging.info("Starting the encoder from %s (vocab %d)", config.init_from, cfg.vocab_size)
    return jax.device_get(params)


def _with_teacher(run: Run, step_fn, distill: Distillation, params: Any):
    """The train step with the teacher's parameters, replicated on the mesh, as its 4th argument."""
    if distill.teacher.config.target_vocab != run.model.config.target_vocab:
        raise TrainingError(
            f"teacher vocabulary {distill.teacher.config.target_vocab} != the student's "
            f"{run.model.config.target_vocab}: a student must use its teacher's tokenizer"
        )
    params = jax.device_put(params, NamedSharding(run.mesh, PartitionSpec()))
    return functools.partial(step_fn, teacher_params=params)


def _check_workdir(workdir: epath.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"workdir {workdir} is not writable: {e}") from e


@dataclasses.dataclass
class Run:
    """What the loop works with, built once by `setup`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    data: TranslationData | TaskData
    tokenizer: Tokenizer
    model: Any  # recipe.build_model's: Transformer, MaskedLM or Classifier
    masking: Masking | None  # the masked-LM corruption; None for the other tasks
    mesh: Any
    train_iter: Any
    checkpointer: checkpoint.Checkpointer
    meta: dict[str, Any]


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Prepare data and tokenizer, the mesh, the model and the data iterator."""
    recipe.validate(config)  # before the workdir or anything else is made
    root = epath.Path(workdir)
    _check_workdir(root)
    options = recipe.pipeline_options(config)
    data = recipe.prepare_data(config, root)
    _check_splits(config, data)
    task = recipe.task(config)
    _keep_saved_tokenizer(root)
    tokenizer = load_or_train_tokenizer(
        root / "spm.model",
        data.source("train"),
        vocab_size=config.vocab_size,
        user_symbols=(MASK_PIECE,) if recipe.encoder_only(config) else (),
        normalization=config.tokenizer_normalization,
    )
    source = train_source(data, tokenizer, options, root)
    mesh = sharding.make_mesh(tuple(config.mesh))
    labels = recipe.label_names(config, data) if task == "classification" else ()
    model_cfg = recipe.model_config(config, num_labels=len(labels))
    meta = {
        "model": checkpoint.config_to_json(model_cfg),
        "train": config.to_dict(),
        "labels": list(labels),
    }
    return Run(
        config=config,
        workdir=root,
        data=data,
        tokenizer=tokenizer,
        model=recipe.build_model(task, model_cfg),
        masking=_masking(config, tokenizer),
        mesh=mesh,
        # Read and placed in the loop's thread: dispatch is asynchronous, so batch k + 1 is
        # made while step k runs. A reader thread was slower (it contends for the GIL): with
        # loop_overhead.py's free step 3.0-3.3 ms a step against 2.4-2.9, equal with a real one.
        train_iter=iter(
            train_dataset(source, tokenizer, options).map(
                functools.partial(sharding.place_batch, mesh=mesh)
            )
        ),
        checkpointer=checkpoint.Checkpointer(root, keep=config.keep_checkpoints),
        meta=meta,
    )


def _check_splits(config: ml_collections.ConfigDict, data: TranslationData | TaskData) -> None:
    """Before any training: the splits evaluated during and after it exist."""
    named = {"eval_split": config.eval_split, "test_split": config.test_split}
    missing = {k: v for k, v in named.items() if v and v not in data.split_sizes}
    if "train" not in data.split_sizes or missing:
        raise TrainingError(
            f"the dataset has splits {sorted(data.split_sizes)}: no 'train' split, or none "
            f"named as {missing}"
        )


def train_source(
    data: TranslationData | TaskData,
    tokenizer: Tokenizer,
    options: PipelineOptions,
    workdir: epath.Path,
) -> Any:
    """The train split, tokenized once into <workdir>/data/tokenized (see data.token_cache)."""
    identity = data.builder_dir
    if isinstance(data, TranslationData):
        identity += f"|{data.source_lang}->{data.target_lang}"
    source = data.source("train")
    return tokenized_train_split(
        source, tokenizer, options, workdir / "data/tokenized", identity=identity
    )


def _masking(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Masking | None:
    if recipe.task(config) != "masked_lm":
        return None
    if tokenizer.mask_id is None:
        raise TrainingError(f"the tokenizer has no {MASK_PIECE} piece; use a new workdir")
    return Masking(tokenizer.mask_id, tokenizer.vocab_size, rate=config.mask_rate)


def _example_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Zeros shaped like one per-process batch, for tracing the model's init."""
    rows = config.batch_size // jax.process_count()
    shapes = train_batch_shapes(
        rows,
        config.max_source_len,
        config.max_target_len,
        config.pack,
        encoder_only=recipe.encoder_only(config),
        labels=recipe.task(config) == "classification",
    )
    return {k: np.zeros(shape, np.int32) for k, shape in shapes.items()}


def _check_resumable(run: Run) -> None:
    """Refuse to resume a workdir whose saved model config differs from this one."""
    step = run.checkpointer.latest_step()
    if step is None:
        return
    saved = checkpoint.read_meta(run.workdir, step)
    differ = {
        k: (v, run.meta["model"].get(k))
        for k, v in saved["model"].items()
        if run.meta["model"].get(k) != v
    }
    if differ:
        raise TrainingError(
            f"{run.workdir} holds checkpoint {step} of a different model "
            f"(field: (saved, now)) {differ}; use a new workdir"
        )


def create_or_restore(
    run: Run, optimizer, encoder_params: Any = None
) -> tuple[train_lib.TrainState, Any]:
    """A fresh sharded state (its encoder from `encoder_params` when given), or the latest
    checkpoint restored straight into its shardings."""
    _check_resumable(run)
    example = _example_batch(run.config)
    step = run.checkpointer.latest_step()
    if step is None:
        rng = jax.random.key(run.config.seed)
        state, shardings = train_lib.create_train_state(
            rng, run.model, optimizer, example, run.mesh
        )
        if encoder_params is not None:
            try:
                params = load_encoder(jax.device_get(state.params), encoder_params)
            except ValueError as e:
                raise TrainingError(f"init_from={run.config.init_from}: {e}") from e
            state = state.replace(params=jax.device_put(params, shardings.params))
        return state, shardings
    abstract, shardings = train_lib.abstract_train_state(run.model, optimizer, example, run.mesh)
    try:
        state = run.checkpointer.restore(abstract, run.train_iter, step)
    except checkpoint.CheckpointError as e:
        if not isinstance(e.__cause__, PipelineStateError):
            raise
        # Saved by an older input pipeline: the weights matter, the data order does not.
        logging.warning("%s: the weights resume, the data starts a new epoch", e.__cause__)
        state = run.checkpointer.restore(abstract, None, step)
    logging.info("Resumed from step %d in %s", step, run.workdir)
    return state, shardings


class _Preemption:
    """SIGTERM (a cloud preemption notice) -> a checkpoint at a step every process agrees on.

    Checked after every step, and the loop keeps at most one step queued behind the running
    one, so the save starts within about two step times of the signal, however long a step
    is. One process: our own flag, set by SIGTERM or a first Ctrl-C (SIGINT; a second one
    stops at once). Several: JAX's preemption sync point, whose coordination service hears
    SIGTERM on any host and names the next step every host will reach; asking costs a local
    read, not a collective.
    """

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.requested = ""  # the signal's name, once one came
        # Several processes: JAX's own handler (installed by jax.distributed) must keep SIGTERM.
        signals = () if self.multihost else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: the user will not wait for the save
        self.requested = signal.Signals(signum).name
        logging.warning("%s: saving a checkpoint before exiting", self.requested)

    def due(self, step: int) -> bool:
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self.requested)

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _summaries(metrics: dict[str, Any], seconds: float, steps: int) -> dict[str, float]:
    """Summed device metrics over `steps` steps -> per-token loss, accuracy, ppl, tokens/s."""
    m = {k: float(np.sum(v)) for k, v in jax.device_get(metrics).items()}
    tokens = max(m["tokens"], 1.0)
    return {
        "loss": m["loss"] / tokens,
        "nll": m["nll"] / tokens,
        "perplexity": float(np.exp(min(m["nll"] / tokens, 50.0))),
        "accuracy": m["correct"] / tokens,
        "grad_norm": m["grad_norm"] / steps,
        "learning_rate": m["learning_rate"] / steps,
        "tokens_per_second": m["tokens"] / max(seconds, 1e-9),
    }


def _summary_writer(logdir: str) -> Any:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed (3-4 s at every start on 2 cores) only to accept torch tensors, and this
    writer is given floats."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class MetricWriter:
    """Process 0 writes TensorBoard event files and metrics.jsonl (one line per record)."""

    def __init__(self, workdir: epath.Path) -> None:
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self.tensorboard = _summary_writer(str(workdir / "tensorboard"))
            self.jsonl = (workdir / "metrics.jsonl").open("a")

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}
        for k, v in numbers.items():
            self.tensorboard.add_scalar(f"{split}/{k}", v, step)
        self.tensorboard.flush()
        self.jsonl.write(json.dumps({"step": step, "split": split, **numbers}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self.jsonl.close()


def _evaluate(run: Run, params: Any, split: str, decode_sentences: int | None) -> dict[str, Any]:
    """Loss on `split`, and the scores of its first `decode_sentences` (None: all) decoded."""
    options = recipe.eval_options(run.config)
    source = run.data.source(split)
    if recipe.encoder_only(run.config):
        return evaluate.evaluate_encoder_split(
            run.model,
            params,
            run.tokenizer,
            source,
            options,
            masking=run.masking,
            mesh=run.mesh,
        )
    return evaluate.evaluate_split(
        run.model,
        params,
        run.tokenizer,
        source,
        options,
        decode_sentences=decode_sentences,
        mesh=run.mesh,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per `config` in `workdir`, resuming if it holds checkpoints; returns final metrics."""
    sharding.initialize_distributed()
    # Before the teacher is restored, which writes its tokenizer into the workdir; setup()
    # checks again for callers that start there.
    recipe.validate(config)
    teacher = _restore_teacher(config, epath.Path(workdir))
    encoder_params = _restore_encoder(config, epath.Path(workdir))
    run = setup(config, workdir)
    optimizer, options = recipe.train_step_options(config)
    options = dataclasses.replace(options, masking=run.masking)
    if teacher:
        options = dataclasses.replace(options, distill=teacher[0])
    # Closed on every way out: Orbax's threads otherwise outlive the event loop they report
    # to, and exit prints their "Event loop is closed" tracebacks after our error line.
    try:
        state, shardings = create_or_restore(run, optimizer, encoder_params)
        step_fn = train_lib.JittedTrainStep(run.model, optimizer, shardings, run.mesh, options)
        if teacher:
            step_fn = _with_teacher(run, step_fn, *teacher)
        return _loop(run, state, step_fn)
    finally:
        run.checkpointer.close()


def _save(run: Run, state: Any, step: int, score: float | None = None) -> None:
    run.checkpointer.save(
        step, state, run.train_iter, run.meta, run.tokenizer.model_proto, score=score
    )
    # Orbax finishes the previous async save before starting this one, so by this line every
    # earlier checkpoint is committed.
    logging.info("Checkpoint %d: saving in the background", step)


def _loop(run: Run, state: train_lib.TrainState, step_fn) -> dict[str, Any]:
    """Steps until config.num_train_steps, with logging, evaluation and checkpoints."""
    config = run.config
    writer = MetricWriter(run.workdir)
    preemption = _Preemption()
    rng = jax.random.key(config.seed + 1)
    start = int(state.step)
    pending: list[Any] = []
    tick = time.perf_counter()
    bar = tqdm(
        total=config.num_train_steps,
        initial=start,
        desc="train",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    last_good = run.checkpointer.latest_step()
    try:
        for step in range(start + 1, config.num_train_steps + 1):
            batch = next(run.train_iter)  # already placed on the mesh
            state, metrics = step_fn(state, batch, rng)
            # Dispatch is asynchronous: keep IN_FLIGHT steps queued by waiting for the one that
            # many behind, which has normally finished, so the device always has the next step
            # and the host never waits on the step it just sent. Unbounded, the loop ran up to
            # log_every steps ahead and a SIGTERM's save waited behind all of them.
            if len(pending) >= IN_FLIGHT:
                jax.block_until_ready(pending[-IN_FLIGHT])
            pending.append(metrics)
            bar.update(1)
            checkpoint_due = step % config.checkpoint_every == 0 or step == config.num_train_steps
            if step % config.log_every == 0 or checkpoint_due:
                summary = _summaries(
                    jax.tree_util.tree_map(lambda *x: jnp.stack(x), *pending),
                    time.perf_counter() - tick,
                    len(pending),
                )
                pending, tick = [], time.perf_counter()
                if not np.isfinite(summary["loss"]):
                    raise TrainingError(
                        f"loss is {summary['loss']} at step {step}; stopped. The last good "
                        f"checkpoint (step {last_good}) is kept in {run.workdir}"
                    )
                bar.set_postfix(
                    loss=f"{summary['loss']:.3f}",
                    lr=f"{summary['learning_rate']:.2e}",
                    tok_s=f"{summary['tokens_per_second']:.0f}",
                )
                writer.write(step, "train", summary)
            score = None
            if step % config.eval_every == 0 or step == config.num_train_steps:
                result = _evaluate(
                    run, state.params, config.eval_split, config.eval_decode_sentences
                )
                logging.info("step %d %s: %s", step, config.eval_split, result)
                writer.write(step, config.eval_split, result)
                score = result.get(recipe.best_by(config))
            if checkpoint_due or score is not None:
                _save(run, state, step, score)
                last_good = step
            if preemption.due(step):
                if last_good != step:
                    _save(run, state, step)
                run.checkpointer.wait()
                logging.warning(
                    "Saved step %d after %s; exiting", step, preemption.requested or "SIGTERM"
                )
                return {"preempted_at": step}
        run.checkpointer.wait()
        return _final(run, state.params)
    finally:
        bar.close()
        preemption.restore()
        writer.close()


def _final(run: Run, params: Any) -> dict[str, Any]:
    """Score the final model on config.test_split (every sentence decoded) and print it;
    nothing when test_split is empty."""
    config = run.config
    if not config.test_split:
        logging.info("No test pass: config.test_split is empty")
        return {}
    result = _evaluate(run, params, config.test_split, decode_sentences=None)
    print(f"{config.test_split}: {evaluate.describe(recipe.task(config), result)}", flush=True)
    return result
