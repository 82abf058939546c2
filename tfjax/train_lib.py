"""Train state, the learning-rate schedule, losses, and the jitted train and eval steps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfjax import distill as distill_lib
from tfjax import masking as masking_lib
from tfjax import scheduled_sampling, sharding
from tfjax.distill import Distillation
from tfjax.masking import Masking
from tfjax.model import Transformer
from tfjax.scheduled_sampling import ScheduledSampling

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_SAMPLING_STREAM = 1 << 20  # fold_in data for scheduled sampling's randomness
_MASKING_STREAM = 1 << 21  # fold_in data for the masked-LM corruption


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it can be donated, sharded and checkpointed."""

    step: jax.Array  # int32 [], optimizer updates applied so far
    params: Any  # the model's "params" collection
    opt_state: Any  # optax state, sharded like the parameters it mirrors


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a train step does besides the optimizer update; one object for every step helper."""

    label_smoothing: float = 0.0  # mass spread over the wrong tokens (see `token_scores`)
    accum_steps: int = 1  # micro-batches per step, run one after another; divides the batch
    learning_rate: optax.Schedule | None = None  # reported in the metrics when given
    sampling: ScheduledSampling | None = None  # scheduled sampling at p(step); None: off
    distill: Distillation | None = None  # distil from this teacher; None: off
    masking: Masking | None = None  # masked-LM pretraining (a MaskedLM model); None: off


def rsqrt_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    """The paper's schedule: linear warmup to `peak`, then peak * sqrt(warmup_steps / step).

    The paper writes it as d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), whose peak is
    (d_model * warmup)^-0.5: 7.0e-4 for the base model with 4,000 warmup steps.
    """
    warmup = max(int(warmup_steps), 1)

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.maximum(count + 1, 1).astype(jnp.float32)  # optax counts from 0
        return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


def make_optimizer(
    schedule: optax.Schedule, clip_norm: float = 0.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Adam(0.9, 0.98, 1e-9) on `schedule` (e.g. `rsqrt_schedule`); optional clip and decay."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    adam = optax.adamw if weight_decay > 0 else optax.adam
    extra = dict(weight_decay=weight_decay) if weight_decay > 0 else {}
    parts.append(adam(schedule, b1=0.9, b2=0.98, eps=1e-9, **extra))
    return optax.chain(*parts)


def token_scores(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token label-smoothed loss, plain negative log-likelihood, and top-1 hit.

    One log-sum-exp over the vocabulary serves all three, and the smoothed target is never
    materialised: with soft = low everywhere and confidence at the target,
      -sum_v soft_v log p_v = (confidence - low) nll + low sum_v (logZ - logits_v),
    where nll = logZ - logits_target. The gradient is written out (`_scores_bwd`): one fused
    pass over [B, T, V] that keeps only logZ besides the logits, where autodiff would store
    the exponentials, the target mask and the selected logits, each as large as the logits.

    Args:
      logits: float [B, T, V].
      targets: int [B, T].
      label_smoothing: mass spread evenly over the V - 1 wrong tokens.
    Returns:
      float32 [B, T] smoothed loss minus the smoothed target's entropy (a model that predicts
      that target exactly has loss 0); float32 [B, T] nll; float32 [B, T] 1 where the
      target's logit is the largest (ties count as hits), else 0, with zero gradient.
    """
    return _scores(logits.astype(jnp.float32), targets, label_smoothing)


def _smoothing(label_smoothing: float, vocab: int) -> tuple[float, float]:
    """(probability at the target, at each other token) of the smoothed target."""
    return 1.0 - label_smoothing, label_smoothing / (vocab - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scores(
    logits: jax.Array, targets: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _scores_fwd(logits, targets, label_smoothing)[0]


def _scores_fwd(logits: jax.Array, targets: jax.Array, label_smoothing: float):
    vocab = logits.shape[-1]
    confidence, low = _smoothing(label_smoothing, vocab)
    top = jnp.max(logits, axis=-1)  # [B, T]
    logz = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))  # [B, T]
    # A gather, not a sum over a masked [B, T, V] copy: XLA:CPU materialises that select (its
    # iota-compare does not fuse into the reduction), a pass that cost ~9% of a W-small step.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    nll = logz - target_logit
    loss = (confidence - low) * nll
    if label_smoothing > 0:
        entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low))
        loss += low * (vocab * logz - jnp.sum(logits, axis=-1)) - entropy
    hit = (target_logit >= top).astype(jnp.float32)
    return (loss, nll, hit), (logits, targets, logz)


def _scores_bwd(label_smoothing: float, residuals, cotangents):
    # d loss / d logits = p - (confidence - low) onehot - low;  d nll / d logits = p - onehot.
    logits, targets, logz = residuals
    g_loss, g_nll, _ = cotangents  # [B, T] each; a hit's gradient is zero almost everywhere
    confidence, low = _smoothing(label_smoothing, logits.shape[-1])
    p = jnp.exp(logits - logz[..., None])  # [B, T, V]
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    at_target = (confidence - low) * g_loss + g_nll
    grad = (g_loss + g_nll)[..., None] * p - low * g_loss[..., None]
    return grad - jnp.where(is_target, at_target[..., None], 0.0), None


_scores.defvjp(_scores_fwd, _scores_bwd)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Label-smoothed cross-entropy summed over tokens, and the number of tokens.

    Args:
      logits: float [B, T, V].
      targets: int [B, T].
      weights: float [B, T], 0 on padding.
      label_smoothing: as in `token_scores`.
    Returns:
      (sum of weighted per-token losses of `token_scores`, sum of weights).
    """
    loss, _, _ = token_scores(logits, targets, label_smoothing)
    return jnp.sum(loss * weights), jnp.sum(weights)


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The batch contract's keys -> the model's keyword arguments: Transformer.__call__'s, or
    an encoder-only model's (inputs, plus segment ids and positions when packed)."""
    if "decoder_inputs" not in batch:
        keys = ("inputs", "inputs_segment_ids", "inputs_positions")
        return {k: batch[k] for k in keys if k in batch}
    keys = ("inputs_segment_ids", "inputs_positions", "targets_segment_ids", "targets_positions")
    return dict(
        inputs=batch["inputs"],
        decoder_inputs=batch["decoder_inputs"],
        **{k: batch[k] for k in keys if k in batch},
    )


def _sampled_inputs(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    model: Transformer,
    sampling: ScheduledSampling,
    step: jax.Array,
) -> dict[str, jax.Array]:
    """Model inputs whose decoder inputs mix gold tokens and first-pass predictions."""
    inputs = model_inputs(batch)
    first = model.apply({"params": jax.lax.stop_gradient(params)}, **inputs)  # [B, T, V]
    predict_rng, mix_rng = jax.random.split(rng)
    predictions = scheduled_sampling.first_pass_predictions(first, sampling.sample, predict_rng)
    allowed = scheduled_sampling.replaceable(batch["targets"], batch.get("targets_segment_ids"))
    inputs["decoder_inputs"], _ = scheduled_sampling.mix(
        batch["decoder_inputs"], predictions, allowed, sampling.probability(step), mix_rng
    )
    return inputs


def _loss_sums(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    teacher_params: Any,
    *,
    model: Transformer,
    options: StepOptions,
) -> tuple[jax.Array, Metrics]:
    """Summed training loss of one micro-batch at optimizer step `step`, with metric sums.

    With `options.sampling`, the loss is taken on the second pass of scheduled sampling;
    with `options.distill`, it mixes in the teacher's (see `tfjax.distill`). The metrics'
    loss is the optimised one; nll stays the student's plain negative log-likelihood.
    Encoder-only tasks: a batch with "label" trains a Classifier (one "token" per example),
    `options.masking` a MaskedLM (the tokens are the predicted pieces).
    """
    if "label" in batch:
        return _classifier_sums(params, batch, rng, model, options.label_smoothing)
    if options.masking is not None:
        return _masked_lm_sums(params, batch, rng, model, options)
    inputs = model_inputs(batch)
    if options.sampling is not None:
        # Its own stream: dropout keeps `rng`, so p(step) = 0 reproduces teacher forcing.
        sampling_rng = jax.random.fold_in(rng, _SAMPLING_STREAM)
        inputs = _sampled_inputs(params, batch, sampling_rng, model, options.sampling, step)
    logits = model.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": rng})
    weights = (batch["targets"] != model.config.pad_id).astype(jnp.float32)
    loss, metrics = _sums(logits, batch["targets"], weights, options.label_smoothing)
    if options.distill is not None:
        teacher = distill_lib.teacher_logits(options.distill, teacher_params, inputs)
        loss = distill_lib.loss_sum(options.distill, logits, teacher, loss, weights)
    return loss, metrics | dict(loss=loss)


def _sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float
) -> tuple[jax.Array, Metrics]:
    """logits [B, T, V], targets [B, T], weights [B, T] -> (loss sum, metric sums)."""
    losses, nlls, hits = token_scores(logits, targets, label_smoothing)
    loss = jnp.sum(losses * weights)
    return loss, dict(
        loss=loss,
        nll=jnp.sum(nlls * weights),
        tokens=jnp.sum(weights),
        correct=jnp.sum(hits * weights),
    )


def _classifier_sums(
    params: Any, batch: Batch, rng: jax.Array | None, model: nn.Module, label_smoothing: float
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy of the class logits [B, C] against batch["label"] [B] (-1: padding row)."""
    train = rng is not None
    logits = model.apply(
        {"params": params}, batch["inputs"], deterministic=not train,
        rngs={"dropout": rng} if train else None,
    )  # fmt: skip
    labels = batch["label"][:, None]  # [B, 1]: one "token" per example
    weights = (labels >= 0).astype(jnp.float32)
    return _sums(logits[:, None], jnp.maximum(labels, 0), weights, label_smoothing)


def _masked_lm_sums(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    model: nn.Module,
    options: StepOptions,
    deterministic: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Loss on the pieces `masking.mask_tokens` selects, predicted from the corrupted rows."""
    mask_rng = jax.random.fold_in(rng, _MASKING_STREAM)
    corrupted, positions, targets, weights = masking_lib.mask_tokens(
        mask_rng, batch["inputs"], options.masking
    )
    inputs = model_inputs(batch) | dict(inputs=corrupted)
    logits = model.apply(
        {"params": params},
        **inputs,
        predict_positions=positions,
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    )  # fmt: skip  [B, P, V]
    return _sums(logits, targets, weights, options.label_smoothing)


def _gradients(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    teacher_params: Any = None,
    *,
    model: Transformer,
    options: StepOptions,
) -> tuple[Any, Metrics]:
    """Gradient of the token-mean loss over `options.accum_steps` micro-batches.

    Sums of losses and gradients are accumulated and divided by the total token count once,
    so the result equals the full-batch gradient whatever the split.
    """
    grad_fn = functools.partial(jax.grad(_loss_sums, has_aux=True), model=model, options=options)
    accum = options.accum_steps
    if accum == 1:  # no loop: XLA optimises a straight-line step better than a 1-trip scan
        grads, metrics = grad_fn(params, batch, jax.random.fold_in(rng, 0), step, teacher_params)
        scale = 1.0 / jnp.maximum(metrics["tokens"], 1.0)
        return jax.tree_util.tree_map(lambda g: g * scale, grads), metrics

    def micro(carry, xs):
        grads, metrics = carry
        micro_batch, index = xs
        g, m = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), step, teacher_params)
        add = functools.partial(jax.tree_util.tree_map, jnp.add)
        return (add(grads, g), add(metrics, m)), None

    # [accum * micro, ...] -> [accum, micro, ...]
    split = jax.tree_util.tree_map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    metrics0 = {k: jnp.zeros((), jnp.float32) for k in ("loss", "nll", "tokens", "correct")}
    (grads, metrics), _ = jax.lax.scan(micro, (zeros, metrics0), (split, jnp.arange(accum)))
    scale = 1.0 / jnp.maximum(metrics["tokens"], 1.0)
    return jax.tree_util.tree_map(lambda g: g * scale, grads), metrics


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    teacher_params: Any = None,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    options: StepOptions,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on `batch` (dict of [global_batch, length]); returns metric sums.

    Dropout randomness is `fold_in(rng, step)`, so a resumed run draws the same masks.
    `teacher_params`: the parameters of `options.distill`'s teacher (see `tfjax.distill`).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = _gradients(
        state.params, batch, step_rng, state.step, teacher_params, model=model, options=options
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if options.learning_rate is not None:
        metrics["learning_rate"] = options.learning_rate(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
    params: Any,
    batch: Batch,
    rng: jax.Array | None = None,
    *,
    model: nn.Module,
    masking: Masking | None = None,
) -> Metrics:
    """Sums of the unsmoothed loss, correct tokens and tokens on one batch.

    Classification counts examples; with `masking` (a MaskedLM), `rng` picks the pieces to
    predict, so a fixed key per batch scores every evaluation on the same masks.
    """
    if "label" in batch:
        _, metrics = _classifier_sums(params, batch, None, model, 0.0)
    elif masking is not None:
        options = StepOptions(masking=masking)
        _, metrics = _masked_lm_sums(params, batch, rng, model, options, deterministic=True)
    else:
        logits = model.apply({"params": params}, **model_inputs(batch))
        weights = (batch["targets"] != model.config.pad_id).astype(jnp.float32)
        _, metrics = _sums(logits, batch["targets"], weights, 0.0)
    return {k: metrics[k] for k in ("nll", "tokens", "correct")}


def _init_state(
    rng: jax.Array, model: Transformer, optimizer: optax.GradientTransformation, example: Batch
) -> TrainState:
    """A fresh state whose parameters (and optimizer moments) are still boxed with axis names."""
    params = model.init(rng, **model_inputs(example))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def abstract_train_state(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    example: Batch,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> tuple[TrainState, Any]:
    """(the state as jax.ShapeDtypeStructs carrying their shardings, its NamedShardings).

    Nothing is allocated: `eval_shape` traces the init, and the parameters' logical axis
    names give the shardings. `example` may itself be ShapeDtypeStructs.
    """

    def init(rng: jax.Array, example: Batch) -> TrainState:
        return _init_state(rng, model, optimizer, example)

    rng = jax.eval_shape(jax.random.key, 0)  # abstract: the mesh may be of absent devices
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        boxed = jax.eval_shape(init, rng, example)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def create_train_state(
    rng: jax.Array,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    example: Batch,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> tuple[TrainState, Any]:
    """Initialise the state directly in its shards; returns (state, its NamedShardings).

    The jitted init writes each shard on its device: no host ever holds the whole model.
    """
    _, shardings = abstract_train_state(model, optimizer, example, mesh, rules)
    init = functools.partial(_init_state, model=model, optimizer=optimizer, example=example)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


class JittedTrainStep:
    """`train_step` jitted with the state donated and kept in its shardings.

    Call it as `train_step` (state, batch, rng, teacher_params=None); `lower` takes the same
    arguments, concrete or jax.ShapeDtypeStructs, for compiling ahead of time.
    """

    def __init__(
        self,
        model: Transformer,
        optimizer: optax.GradientTransformation,
        state_shardings: Any,
        mesh: Mesh,
        options: StepOptions,
        rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    ) -> None:
        step = functools.partial(train_step, model=model, optimizer=optimizer, options=options)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._jitted = jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated))
        self._mesh = mesh
        self._rules = list(rules)

    def __call__(
        self, state: TrainState, batch: Batch, rng: jax.Array, teacher_params: Any = None
    ) -> tuple[TrainState, Metrics]:
        # The rules and mesh must be active while tracing, for the model's activation hints.
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted(state, batch, rng, teacher_params)

    def lower(
        self, state: Any, batch: Any, rng: Any, teacher_params: Any = None
    ) -> jax.stages.Lowered:
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted.lower(state, batch, rng, teacher_params)
