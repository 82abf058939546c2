"""Knowledge distillation: the token-level loss with a teacher inside the train step.

Token-level (Hinton et al. 2015; Kim & Rush 2016): the student's loss on each target token is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
      + (1 - alpha) * label-smoothed cross-entropy,

summed over the non-padding target tokens of the batch and divided by their number, like the
plain loss (`train_lib._gradients` does the division). The teacher is any trained tfjax model
with the same target vocabulary: its own size and config, restored from its checkpoint,
run in the same jitted step without dropout and without gradient. Sequence-level
distillation (training on the teacher's beam-search translations) is data, not a loss:
`write_distillation_data` (`python -m tfjax distill-data`) writes them as a folder dataset.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from etils import epath
from tqdm import tqdm

from tfjax.model import Transformer

if TYPE_CHECKING:  # the translator imports the train step, which imports this module
    from tfjax.data import TranslationData
    from tfjax.translator import Translator


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The teacher module (its parameters are a train-step argument) and the loss mix."""

    teacher: Transformer
    alpha: float  # weight of the distillation term; 0 is plain training
    temperature: float  # T: both distributions are softened by it; T^2 keeps gradient scale

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


def kl_sum(
    student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, temperature: float
) -> jax.Array:
    """sum_tokens weights * KL(softmax(teacher / T) || softmax(student / T)).

    Args:
      student_logits, teacher_logits: float [B, T, V].
      weights: float [B, T], 0 on padding.
      temperature: T > 0.
    Returns:
      float32 [].
    """
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)  # [B, T, V]
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)  # [B, T]
    return jnp.sum(kl * weights)


def teacher_logits(
    distill: Distillation, teacher_params: Any, inputs: dict[str, jax.Array]
) -> jax.Array:
    """The teacher's logits [B, T, V] on the student's inputs: no dropout, no gradient."""
    logits = distill.teacher.apply({"params": teacher_params}, **inputs)
    return jax.lax.stop_gradient(logits)


def loss_sum(
    distill: Distillation,
    student: jax.Array,
    teacher: jax.Array,
    ce_sum: jax.Array,
    weights: jax.Array,
) -> jax.Array:
    """alpha * T^2 * KL sum + (1 - alpha) * the label-smoothed cross-entropy sum `ce_sum`."""
    kl = kl_sum(student, teacher, weights, distill.temperature)
    return distill.alpha * distill.temperature**2 * kl + (1.0 - distill.alpha) * ce_sum


def write_distillation_data(
    translator: Translator,
    data: TranslationData,
    langs: tuple[str, str],
    output: str,
    *,
    beam_size: int,
    alpha: float,
) -> epath.Path:
    """Sequence-level distillation data (Kim & Rush 2016): the teacher translates train.

    Every split of the teacher's dataset is written as <split>.<source lang> and
    <split>.<target lang> into `output`; train's targets are the teacher's beam-search
    translations, the other splits keep their references. Pairs whose translation is empty
    are left out. Returns the folder.
    """
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for split in data.split_sizes:
        pairs = [(e["source"], e["target"]) for e in data.source(split).examples()]
        if split == "train":
            sources = [s for s, _ in pairs]
            stream = translator.translate_stream(sources, beam_size=beam_size, alpha=alpha)
            translated = tqdm(stream, total=len(sources), desc="teacher")
            pairs = [(s, t.text) for s, t in zip(sources, translated, strict=True) if t.text]
            if len(pairs) < len(sources):
                print(f"left out {len(sources) - len(pairs)} pairs whose translation was empty")
        (out / f"{split}.{langs[0]}").write_text("".join(s + "\n" for s, _ in pairs))
        (out / f"{split}.{langs[1]}").write_text("".join(t + "\n" for _, t in pairs))
        print(f"{split}: {len(pairs)} pairs", flush=True)
    return out
