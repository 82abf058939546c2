"""A recipe (a configs/*.py ConfigDict) turned into typed objects for every entry point.

The trainer, `python -m tfjax precompile`, evaluation of a trained workdir and the benchmarks
read a config only through these functions, so a key means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import linen as nn

from tfjax import checkpoint, train_lib
from tfjax.data import (
    NORMALIZATIONS,
    PAD_ID,
    PipelineOptions,
    TaskData,
    TranslationData,
    prepare,
    prepare_task,
)
from tfjax.evaluate import EvalOptions
from tfjax.model import Classifier, MaskedLM, Transformer, TransformerConfig, preset
from tfjax.scheduled_sampling import ScheduledSampling


class ConfigError(ValueError):
    """A config that cannot work: a missing or inconsistent value."""


# pad, unk, bos and eos, sentencepiece's 256 byte-fallback pieces, and at least one more.
MIN_VOCAB_SIZE = 4 + 256 + 1
# Task -> the kind of `prepare_task` folder it reads (translation reads parallel text).
TASKS = {"translation": None, "summarization": None, "masked_lm": "text", "classification": "tsv"}
# The evaluation figure that picks the best checkpoint, per task.
BEST_BY = {"translation": "bleu", "summarization": "rouge_mean"}
_DROPOUTS = ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate")
# (keys, test, what the test asks) for the values that `validate` checks one by one.
_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (
        ("learning_rate", "num_train_steps", "batch_size", "max_source_len", "max_target_len")
        + ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"),
        lambda v: v > 0,
        "> 0",
    ),
    (
        ("warmup_steps", "eval_decode_sentences", "clip_norm", "weight_decay"),
        lambda v: v >= 0,
        ">= 0",
    ),
    (("accum_steps", "eval_beam_size"), lambda v: v >= 1, ">= 1"),
    (("eval_min_length", "eval_no_repeat_ngram_size"), lambda v: v >= 0, ">= 0"),
    (("label_smoothing",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("mask_rate",), lambda v: 0 < v < 1, "in (0, 1)"),
    (
        ("vocab_size",),
        lambda v: v >= MIN_VOCAB_SIZE,
        f">= {MIN_VOCAB_SIZE} (4 special ids and 256 bytes)",
    ),
    (("tokenizer_normalization",), lambda v: v in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
    (
        ("mesh",),
        lambda v: len(v) == 3 and all(s == -1 or s >= 1 for s in v) and list(v).count(-1) <= 1,
        "3 sizes (data, fsdp, tensor), each >= 1 or one of them -1",
    ),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse a config that cannot train, naming every bad value at once, before any work."""
    problems = [
        f"{key}={config[key]!r} must be {wants}"
        for keys, test, wants in _RULES
        for key in keys
        if not test(config[key])
    ]
    if config.accum_steps >= 1 and config.batch_size % config.accum_steps:
        problems.append(
            f"batch_size={config.batch_size} is not divisible by accum_steps={config.accum_steps}"
        )
    if config.batch_size % jax.process_count():
        processes = jax.process_count()
        problems.append(f"batch_size={config.batch_size} is not divisible by {processes} processes")
    try:
        model = model_config(config)
    except (ValueError, TypeError) as e:
        problems.append(f"model: {e}")
    else:
        problems += [
            f"model.{name}={getattr(model, name)!r} must be in [0, 1)"
            for name in _DROPOUTS
            if not 0 <= getattr(model, name) < 1
        ]
        problems += [
            f"{key}={config[key]} must be <= model.max_len={model.max_len}"
            for key in ("max_source_len", "max_target_len")
            if config[key] > model.max_len
        ]
    problems += _task_problems(config)
    if problems:
        raise ConfigError(f"{len(problems)} bad config value(s): " + "; ".join(problems))


def task(config: ml_collections.ConfigDict) -> str:
    """The config's task; configs written before encoder-only tasks are translation."""
    return config.task if "task" in config else "translation"


def encoder_only(config: ml_collections.ConfigDict) -> bool:
    return task(config) not in ("translation", "summarization")


def best_by(config: ml_collections.ConfigDict) -> str:
    """The evaluation result's key that picks the best checkpoint: BLEU, ROUGE or accuracy."""
    return BEST_BY.get(task(config), "accuracy")


def _task_problems(config: ml_collections.ConfigDict) -> list[str]:
    name = task(config)
    if name not in TASKS:
        return [f"task={name!r} must be one of {list(TASKS)}"]
    problems = []
    if name == "classification" and config.pack:
        problems.append("task='classification' needs pack=False (one example per row)")
    if config.get("init_from") and name == "masked_lm":
        problems.append("init_from (a masked-LM workdir) starts the other tasks, not masked_lm")
    if config.get("init_from") and config.distill.teacher_workdir:
        # Each would give the workdir its own tokenizer; the model can read only one.
        problems.append("init_from and distill.teacher_workdir both choose the tokenizer; set one")
    if encoder_only(config) and config.dataset != "folder":
        problems.append(f"task={name!r} reads dataset='folder' (data_dir: a folder of files)")
    if encoder_only(config) and config.distill.teacher_workdir:
        problems.append("distillation is for translation")
    return problems


def model_config(config: ml_collections.ConfigDict, num_labels: int = 0) -> TransformerConfig:
    """config.model (a preset name plus overrides) and config.vocab_size -> TransformerConfig.

    num_labels: a classifier's classes, known once its data is prepared.
    """
    fields = dict(config.model)
    name = fields.pop("preset")
    dtype = jnp.dtype(fields.pop("dtype"))
    if num_labels:
        fields["num_labels"] = num_labels
    return preset(name, vocab_size=config.vocab_size, dtype=dtype, pad_id=PAD_ID, **fields)


def build_model(task_name: str, model_cfg: TransformerConfig) -> nn.Module:
    """The module a task trains: Transformer, MaskedLM or Classifier."""
    modules = {"masked_lm": MaskedLM, "classification": Classifier}
    return modules.get(task_name, Transformer)(model_cfg)


def sampling_config(config: ml_collections.ConfigDict) -> ScheduledSampling | None:
    """The recipe's scheduled sampling, or None while its schedule is ""."""
    values = config.scheduled_sampling.to_dict()
    return ScheduledSampling(**values) if values["schedule"] else None


def train_step_options(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, train_lib.StepOptions]:
    """The recipe's optimizer and step options, without a distillation teacher (the trainer
    restores one from config.distill), shared by the trainer and `tfjax.precompile`."""
    schedule = train_lib.rsqrt_schedule(config.learning_rate, config.warmup_steps)
    optimizer = train_lib.make_optimizer(schedule, config.clip_norm, config.weight_decay)
    options = train_lib.StepOptions(
        label_smoothing=config.label_smoothing,
        accum_steps=config.accum_steps,
        learning_rate=schedule,
        sampling=sampling_config(config),
    )
    return optimizer, options


def pipeline_options(config: ml_collections.ConfigDict) -> PipelineOptions:
    """The training pipeline of this process: its share of config.batch_size rows."""
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by the {jax.process_count()} "
            "processes"
        )
    return PipelineOptions(
        batch_size=config.batch_size // jax.process_count(),
        max_source_len=config.max_source_len,
        max_target_len=config.max_target_len,
        pack=config.pack,
        seed=config.seed,
        encoder_only=encoder_only(config),
        # Long texts keep their start rather than being dropped: a classifier's example
        # count and label balance, and the dialogues summarized, stay those of the file.
        truncate=task(config) != "translation",
    )


def eval_options(config: ml_collections.ConfigDict) -> EvalOptions:
    """How the recipe evaluates a split: batches, the length limits, beam and penalty."""
    return EvalOptions(
        batch_size=config.eval_batch_size,
        max_source_len=config.max_source_len,
        max_target_len=config.max_target_len,
        beam_size=config.eval_beam_size,
        alpha=config.eval_alpha,
        # Workdirs trained before these keys existed decode without them.
        min_length=config.eval_min_length if "eval_min_length" in config else 0,
        no_repeat_ngram_size=(
            config.eval_no_repeat_ngram_size if "eval_no_repeat_ngram_size" in config else 0
        ),
        rouge=task(config) == "summarization",
    )


def prepare_data(
    config: ml_collections.ConfigDict, workdir: epath.Path
) -> TranslationData | TaskData:
    """The dataset a config names, in its direction.

    "synthetic" and "folder" (the text files in config.data_dir) are built as array_record
    TFDS datasets under <workdir>/data; a TFDS name is read from config.data_dir (TFDS's
    default data directory when empty). Encoder-only tasks read a folder of TSV files
    (classification) or plain text files (masked LM), see `tfjax.data.task_folders`.
    """
    built = str(workdir / "data")
    kind = TASKS.get(task(config))
    if kind:
        if not config.data_dir:
            raise ConfigError(f"task={task(config)!r} needs --config.data_dir=<folder>")
        return prepare_task(config.data_dir, kind, built)
    common = dict(source_lang=config.source_lang, target_lang=config.target_lang)
    if config.dataset == "folder":
        if not config.data_dir:
            raise ConfigError("dataset='folder' needs --config.data_dir=<folder of text files>")
        return prepare(config.data_dir, data_dir=built, **common)
    if config.dataset == "synthetic":
        return prepare("synthetic", data_dir=built, **common)
    return prepare(config.dataset, data_dir=config.data_dir or None, **common)


def label_names(config: ml_collections.ConfigDict, data: TaskData) -> tuple[str, ...]:
    """A classifier's label names: config.label_names (display names in the order of the
    data's labels) when set, else the labels as the data spells them."""
    names = tuple(config.get("label_names", ()))
    if names and len(names) != len(data.label_names):
        raise ConfigError(
            f"label_names={names} names {len(names)} labels; the data has "
            f"{len(data.label_names)}: {list(data.label_names)}"
        )
    return names or data.label_names


def workdir_data(
    workdir: str, step: int | None = None, data_dir: str | None = None
) -> tuple[ml_collections.ConfigDict, TranslationData | TaskData]:
    """A trained workdir's config (from its checkpoint's meta) and its dataset.

    `data_dir` says where the corpus is now, if it moved since training.
    """
    config = ml_collections.ConfigDict(checkpoint.read_meta(workdir, step)["train"])
    if data_dir:
        config.data_dir = data_dir
    return config, prepare_data(config, epath.Path(workdir))
