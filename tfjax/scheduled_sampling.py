"""Scheduled sampling for the Transformer: decay schedules and the two-pass input mixing.

Bengio et al. (2015) feed the decoder its own previous prediction instead of the gold token
with a probability that grows during training. A Transformer decodes all positions at once,
so, as Mihaylova & Martins (2019), a first teacher-forced pass (no gradient, no dropout)
predicts every position, and the second pass, which the loss is taken on, reads at each
position either the gold previous token or the first pass's prediction of it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from tfjax import decode

Schedule = Literal["linear", "exponential", "inverse_sigmoid"]


@dataclasses.dataclass(frozen=True)
class ScheduledSampling:
    """How the probability of feeding the gold token, epsilon(step), decays (Bengio et al.)."""

    schedule: Schedule
    # linear: epsilon = max(min_truth, k - c * step); exponential: epsilon = k ** step (k < 1);
    # inverse_sigmoid: epsilon = k / (k + exp(step / k)) (k >= 1).
    k: float
    c: float = 0.0  # linear only: decay per step
    min_truth: float = 0.0  # every schedule: epsilon never falls below this
    sample: bool = False  # first-pass predictions sampled from its softmax, else its argmax

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "exponential", "inverse_sigmoid"):
            raise ValueError(f"unknown scheduled-sampling schedule {self.schedule!r}")
        if self.schedule == "exponential" and not 0 < self.k <= 1:
            raise ValueError(f"exponential decay needs 0 < k <= 1, got {self.k}")
        if self.schedule == "inverse_sigmoid" and self.k < 1:
            raise ValueError(f"inverse-sigmoid decay needs k >= 1, got {self.k}")

    def truth_probability(self, step: jax.Array) -> jax.Array:
        """epsilon(step): float32 [] probability of feeding the gold previous token."""
        i = jnp.asarray(step, jnp.float32)
        if self.schedule == "linear":
            eps = self.k - self.c * i
        elif self.schedule == "exponential":
            eps = jnp.power(self.k, i)
        else:  # exp(i / k) overflows to inf for large i, which gives epsilon 0, as it should
            eps = self.k / (self.k + jnp.exp(i / self.k))
        return jnp.clip(eps, self.min_truth, 1.0)

    def probability(self, step: jax.Array) -> jax.Array:
        """p(step) = 1 - epsilon(step): probability of feeding the model's own prediction."""
        return 1.0 - self.truth_probability(step)


def replaceable(targets: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B, T]: positions whose decoder input is the previous target of the same segment.

    Not a segment's first position (it reads bos) and not padding. Unpacked rows (no segment
    ids) are one segment wherever targets are not pad (id 0).
    """
    segments = (targets > 0).astype(jnp.int32) if segment_ids is None else segment_ids
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)  # [B, T - 1]
    return jnp.pad(same, ((0, 0), (1, 0)))  # position 0 always starts a segment


def mix(
    decoder_inputs: jax.Array,
    predictions: jax.Array,
    allowed: jax.Array,
    p: jax.Array,
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Second-pass decoder inputs, and where they were replaced.

    Args:
      decoder_inputs: int [B, T] gold inputs (targets shifted right within segments).
      predictions: int [B, T] first-pass predictions of the targets at each position.
      allowed: bool [B, T] from `replaceable`.
      p: float [] probability of replacing an allowed position.
      rng: PRNG key for the coin flips.
    Returns:
      (inputs [B, T] where a replaced position t holds predictions[t - 1], replaced [B, T]).
    """
    shifted = jnp.pad(predictions[:, :-1], ((0, 0), (1, 0)))  # [B, T]: prediction of t - 1
    replaced = allowed & jax.random.bernoulli(rng, p, decoder_inputs.shape)
    return jnp.where(replaced, shifted, decoder_inputs).astype(decoder_inputs.dtype), replaced


def first_pass_predictions(logits: jax.Array, sample: bool, rng: jax.Array) -> jax.Array:
    """int32 [B, T] token predictions from first-pass logits [B, T, V] (argmax or sampled)."""
    logits = jax.lax.stop_gradient(logits)
    if sample:
        return jax.random.categorical(rng, logits.astype(jnp.float32)).astype(jnp.int32)
    return decode.argmax(logits)  # jnp.argmax's choice, several times faster on XLA:CPU
