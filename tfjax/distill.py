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
import hashlib
import json
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
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

    Nothing is lost to an interruption: each translation is appended to `output`/PARTIAL as
    it is made, and a rerun with the same teacher, sources and settings translates only the
    rest. Each file is written whole (a temporary name, then a rename), train's last.
    """
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for split in sorted(data.split_sizes, key=lambda name: name == "train"):
        pairs = [(e["source"], e["target"]) for e in data.source(split).examples()]
        if split == "train":
            sources = [s for s, _ in pairs]
            targets = _teacher_translations(translator, sources, out / PARTIAL, beam_size, alpha)
            pairs = [(s, t) for s, t in zip(sources, targets, strict=True) if t]
            if len(pairs) < len(sources):
                print(f"left out {len(sources) - len(pairs)} pairs whose translation was empty")
        _write_whole(out / f"{split}.{langs[0]}", "".join(s + "\n" for s, _ in pairs))
        _write_whole(out / f"{split}.{langs[1]}", "".join(t + "\n" for _, t in pairs))
        print(f"{split}: {len(pairs)} pairs", flush=True)
    (out / PARTIAL).unlink(missing_ok=True)
    return out


# The teacher's train translations made so far: a key line, then one JSON string per source.
PARTIAL = ".train.partial"


def _teacher_translations(
    translator: Translator, sources: list[str], partial: epath.Path, beam_size: int, alpha: float
) -> list[str]:
    """The teacher's translation of each source, resuming from (and appending to) `partial`."""
    key = _key(translator, sources, beam_size, alpha)
    done = _resumed(partial, key)
    if done:
        print(f"resuming: {len(done)} of {len(sources)} train sentences translated before")
    stream = translator.translate_stream(sources[len(done) :], beam_size=beam_size, alpha=alpha)
    with partial.open("a") as f:
        for t in tqdm(stream, total=len(sources), initial=len(done), desc="teacher"):
            f.write(json.dumps(t.text) + "\n")
            f.flush()  # an interruption loses at most the line being written
            done.append(t.text)
    return done


def _key(translator: Translator, sources: list[str], beam_size: int, alpha: float) -> str:
    """What decides the translations: the teacher's weights and tokenizer, its limits, the
    sources and the beam settings, hashed."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(translator.params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    digest.update(translator.tokenizer.model_proto)
    digest.update("\n".join(sources).encode())
    limits = (translator.max_source_len, translator.max_decode_len, beam_size, alpha)
    return json.dumps(dict(teacher=digest.hexdigest(), limits_beam_alpha=limits))


def _resumed(partial: epath.Path, key: str) -> list[str]:
    """The translations `partial` holds under `key`, the file rewritten to exactly those
    (a line cut by the interruption is dropped); a partial of other settings is restarted."""
    lines = partial.read_text().splitlines() if partial.exists() else []
    done = []
    if lines and lines[0] == key:
        for line in lines[1:]:
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break
    elif lines:
        print(f"{partial} holds another teacher's or settings' translations: starting over")
    _write_whole(partial, key + "\n" + "".join(json.dumps(t) + "\n" for t in done))
    return done


def _write_whole(path: epath.Path, text: str) -> None:
    """`path` holds `text` or what it held before, never a part of it."""
    part = path.parent / f".{path.name}.tmp"
    part.write_text(text)
    part.replace(path)
