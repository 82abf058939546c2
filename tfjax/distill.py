"""Knowledge distillation: the token-level loss with a teacher inside the train step.

Token-level (Hinton et al. 2015; Kim & Rush 2016): the student's loss on each target token is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
      + (1 - alpha) * label-smoothed cross-entropy,

summed over the non-padding target tokens of the batch and divided by their number, like the
plain loss (`train_lib._gradients` does the division). The teacher is any trained tfjax model
with the same target vocabulary: its own size and config, restored from its checkpoint,
run in the same jitted step without dropout and without gradient. Sequence-level
distillation (training on the teacher's beam-search translations) is data, not a loss:
`python -m tfjax distill-data` writes them as a folder dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tfjax.model import Transformer


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
