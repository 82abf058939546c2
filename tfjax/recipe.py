"""A recipe (a configs/*.py ConfigDict) turned into typed objects for every entry point.

The trainer, `python -m tfjax precompile`, evaluation of a trained workdir and the benchmarks
read a config only through these functions, so a key means the same thing everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from tfjax import checkpoint, train_lib
from tfjax.data import PAD_ID, PipelineOptions, TranslationData, prepare
from tfjax.evaluate import EvalOptions
from tfjax.model import TransformerConfig, preset
from tfjax.scheduled_sampling import ScheduledSampling


class ConfigError(ValueError):
    """A config that cannot work: a missing or inconsistent value."""


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """config.model (a preset name plus overrides) and config.vocab_size -> TransformerConfig."""
    fields = dict(config.model)
    name = fields.pop("preset")
    dtype = jnp.dtype(fields.pop("dtype"))
    return preset(name, vocab_size=config.vocab_size, dtype=dtype, pad_id=PAD_ID, **fields)


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
    )


def eval_options(config: ml_collections.ConfigDict) -> EvalOptions:
    """How the recipe evaluates a split: batches, the length limits, beam and penalty."""
    return EvalOptions(
        batch_size=config.eval_batch_size,
        max_source_len=config.max_source_len,
        max_target_len=config.max_target_len,
        beam_size=config.eval_beam_size,
        alpha=config.eval_alpha,
    )


def prepare_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> TranslationData:
    """The dataset a config names, in its direction.

    "synthetic" and "folder" (the text files in config.data_dir) are built as array_record
    TFDS datasets under <workdir>/data; a TFDS name is read from config.data_dir (TFDS's
    default data directory when empty).
    """
    built = str(workdir / "data")
    common = dict(source_lang=config.source_lang, target_lang=config.target_lang)
    if config.dataset == "folder":
        if not config.data_dir:
            raise ConfigError("dataset='folder' needs --config.data_dir=<folder of text files>")
        return prepare(config.data_dir, data_dir=built, **common)
    if config.dataset == "synthetic":
        return prepare("synthetic", data_dir=built, **common)
    return prepare(config.dataset, data_dir=config.data_dir or None, **common)


def workdir_data(
    workdir: str, step: int | None = None, data_dir: str | None = None
) -> tuple[ml_collections.ConfigDict, TranslationData]:
    """A trained workdir's config (from its checkpoint's meta) and its dataset.

    `data_dir` says where the corpus is now, if it moved since training.
    """
    config = ml_collections.ConfigDict(checkpoint.read_meta(workdir, step)["train"])
    if data_dir:
        config.data_dir = data_dir
    return config, prepare_data(config, epath.Path(workdir))
