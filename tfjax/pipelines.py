"""Hugging Face-style task pipelines over trained workdirs: fill-mask, text-classification,
translation, summarization.

`pipeline(task, workdir=DIR)` restores the workdir's checkpoint and returns a callable that
takes one text or a list of texts, with HF's call options and output fields, so code written
for `transformers.pipeline` reads the same. Inputs are bucketed as the `Translator` buckets
them (rows to a power of two, lengths to a multiple of 16), so a long-lived pipeline
compiles a handful of programs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from tfjax import checkpoint, recipe
from tfjax.data import BOS_ID, MASK_PIECE, Tokenizer
from tfjax.model import Classifier, MaskedLM
from tfjax.translator import Translator, bucket, fitted, padded

# A pipeline task name -> the training task its workdir must hold.
TASKS = {
    "fill-mask": "masked_lm",
    "text-classification": "classification",
    "sentiment-analysis": "classification",
    "translation": "translation",
    "summarization": "summarization",
}


def pipeline(
    task: str,
    workdir: str,
    *,
    batch_size: int = 32,
    step: int | None = None,
    best: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> FillMaskPipeline | TextClassificationPipeline | TranslationPipeline:  # or a subclass
    """The `task` pipeline over `workdir`'s latest (or `step`, or best) checkpoint.

    task: "fill-mask", "text-classification" (alias "sentiment-analysis"), "translation"
    (HF's "translation_xx_to_yy" names are accepted) or "summarization". batch_size: texts
    per model call. devices: translation and summarization decode each batch's rows split
    over these (the `Translator`'s `devices`, e.g. several CPU host devices).
    """
    name = "translation" if task.startswith("translation_") else task
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    trained, pipe = from_workdir(
        workdir, batch_size=batch_size, step=step, best=best, devices=devices
    )
    if trained != TASKS[name]:
        raise ValueError(
            f"{workdir} holds a {trained} model; the {task!r} pipeline needs a "
            f"{TASKS[name]} workdir"
        )
    return pipe


def from_workdir(
    workdir: str,
    *,
    batch_size: int = 32,
    step: int | None = None,
    best: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[str, FillMaskPipeline | TextClassificationPipeline | TranslationPipeline]:
    """(the training task, its pipeline) of whatever `workdir` holds; arguments as `pipeline`.

    Training tasks map to pipelines: masked_lm -> fill-mask, classification ->
    text-classification, translation, summarization.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    cfg, params, tokenizer_bytes, meta = checkpoint.restore_for_inference(workdir, step, best=best)
    trained = recipe.task(ml_collections.ConfigDict(meta["train"]))
    if devices is not None and len(devices) > 1 and trained not in ("translation", "summarization"):
        raise ValueError(
            f"{len(devices)} devices: only translation and summarization split rows; {workdir} "
            f"holds a {trained} model"
        )
    tokenizer = Tokenizer(tokenizer_bytes)
    max_len = meta["train"].get("max_source_len") or cfg.max_len
    if trained in ("translation", "summarization"):
        # A summary's default length limit is the training one (HF's max_length); a
        # translation's is the Translator's, as `python -m tfjax translate` uses.
        longest = meta["train"]["max_target_len"] if trained == "summarization" else 128
        translator = Translator(
            cfg,
            params,
            tokenizer,
            max_source_len=max_len,
            max_decode_len=longest,
            max_batch=batch_size,
            devices=devices,
        )
        kind = TranslationPipeline if trained == "translation" else SummarizationPipeline
        return trained, kind(translator)
    kind = FillMaskPipeline if trained == "masked_lm" else TextClassificationPipeline
    return trained, kind(cfg, params, tokenizer, max_len=max_len, batch_size=batch_size, meta=meta)


def _texts(inputs: str | Sequence[str]) -> tuple[list[str], bool]:
    """(the texts, whether one string was given), refusing empty texts."""
    single = isinstance(inputs, str)
    texts = [inputs] if single else list(inputs)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"input {i} is empty"
                if isinstance(text, str)
                else f"input {i}: {text!r} is not a string"
            )
    return texts, single


class _EncoderPipeline:
    """Encoding, truncation and bucketed batches shared by the encoder-only pipelines."""

    module = MaskedLM  # the model class; subclasses set it

    def __init__(
        self,
        config: Any,
        params: Any,
        tokenizer: Tokenizer,
        *,
        max_len: int,
        batch_size: int = 32,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.model = self.module(config)
        self.params = params
        self.tokenizer = tokenizer
        self.max_len = min(max_len, config.max_len)
        self.batch_size = batch_size
        self.meta = meta or {}

    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Texts -> ids [bos, pieces..., eos]; over-long ones cut (eos kept) with a warning."""
        encoded = self.tokenizer.encode_batch(list(texts))
        return [
            fitted(np.concatenate([[BOS_ID], ids]), self.max_len, "input", i, text)
            for i, (ids, text) in enumerate(zip(encoded, texts, strict=True))
        ]

    def _batches(self, ids: list[np.ndarray]) -> Iterator[tuple[range, np.ndarray]]:
        """Yields (row indices, inputs [bucketed rows, bucketed length])."""
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            rows = bucket(len(chunk), self.batch_size)
            yield range(start, start + len(chunk)), padded(chunk, rows, self.max_len)


@functools.cache
def _mask_probabilities(model: MaskedLM):
    """Jitted (params, inputs [B, S], positions [B, M]) -> probabilities [B, M, V]."""

    def probabilities(params: Any, inputs: jax.Array, positions: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, inputs, predict_positions=positions)
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(probabilities)


class FillMaskPipeline(_EncoderPipeline):
    """HF's "fill-mask": the most likely pieces for each `<mask>` of a text."""

    module = MaskedLM

    @property
    def mask_token(self) -> str:
        return MASK_PIECE

    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """As the base class, but a mask absorbs the word boundary before it.

        "was <mask>" encodes as [▁was, ▁, <mask>], since <mask> is a piece of its own; in
        training the mask replaced a whole piece such as ▁good, boundary included, so the
        lone ▁ goes.
        """
        space = self.tokenizer.piece_id("▁")
        mask = self.tokenizer.mask_id
        out = []
        for ids in super()._encode(texts):
            lone = (ids[:-1] == space) & (ids[1:] == mask)  # [S - 1]
            out.append(ids[np.append(~lone, True)])
        return out

    def __call__(
        self,
        inputs: str | Sequence[str],
        *,
        top_k: int = 5,
        targets: str | Sequence[str] | None = None,
    ) -> list:
        """Per text, per mask, the top_k {score, token, token_str, sequence} best first.

        As HF: one text with one mask gives a list of dicts; a text with several masks a list
        (one per mask, in order) of lists; a list of texts a list of those. `score` is the
        softmax over the whole vocabulary at the mask; candidates are the real pieces (special
        ids and <mask> itself are never proposed), or `targets` (words; the first piece of
        each is used).
        """
        texts, single = _texts(inputs)
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: must be at least 1")
        target_ids = self._target_ids(targets)
        ids = self._encode(texts)
        mask_id = self.tokenizer.mask_id
        masks = [np.flatnonzero(row == mask_id) for row in ids]
        for i, where in enumerate(masks):
            if not len(where) and MASK_PIECE in texts[i]:
                raise ValueError(
                    f"input {i}: its {MASK_PIECE} lies past the first {self.max_len} pieces "
                    "the model reads"
                )
            if not len(where):
                raise ValueError(f"input {i} has no {MASK_PIECE}: {texts[i]!r}")
        results = []
        for rows, batch in self._batches(ids):
            width = bucket(max(len(masks[r]) for r in rows), 1 << 30)
            positions = np.zeros((batch.shape[0], width), np.int32)
            for row, r in enumerate(rows):
                positions[row, : len(masks[r])] = masks[r]
            probs = np.asarray(_mask_probabilities(self.model)(self.params, batch, positions))
            for row, r in enumerate(rows):
                per_mask = [
                    self._candidates(ids[r], where, probs[row, m], top_k, target_ids)
                    for m, where in enumerate(masks[r])
                ]
                results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results[0] if single else results

    @functools.cached_property
    def _pieces(self) -> np.ndarray:
        """The ids a mask may be filled with: every real piece, not pad/unk/bos/eos/<mask>."""
        ids = np.arange(4, self.tokenizer.vocab_size)
        return ids[ids != self.tokenizer.mask_id]

    def _pool(self, vocab: int) -> np.ndarray:
        return self._pieces[self._pieces < vocab]

    def _sequence(self, ids: np.ndarray) -> str:
        """The text of ids whose other masks stay "<mask>", spaced as words: a mask took
        its word boundary (`_encode`), so the pieces around each are decoded apart."""
        cuts = np.flatnonzero(ids == self.tokenizer.mask_id)
        starts, ends = np.append(0, cuts + 1), np.append(cuts, len(ids))
        parts = [self.tokenizer.decode(ids[a:b]).strip() for a, b in zip(starts, ends, strict=True)]
        return f" {MASK_PIECE} ".join(parts).strip()

    def _target_ids(self, targets: str | Sequence[str] | None) -> np.ndarray | None:
        """Each target's first piece id (warning when a target is several pieces)."""
        if targets is None:
            return None
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("targets is empty")
        ids = []
        for target in targets:
            pieces = self.tokenizer.encode(target, add_eos=False)
            if not len(pieces):
                raise ValueError(f"target {target!r} is empty")
            if len(pieces) > 1:
                logging.warning(
                    "target %r is %d pieces; using its first, %r",
                    target, len(pieces), self.tokenizer.piece(int(pieces[0])),
                )  # fmt: skip
            ids.append(int(pieces[0]))
        return np.unique(ids)

    def _candidates(
        self,
        ids: np.ndarray,
        where: int,
        probs: np.ndarray,
        top_k: int,
        target_ids: np.ndarray | None,
    ) -> list[dict[str, Any]]:
        """The top_k fillers of position `where` of `ids` from its probabilities [V]."""
        pool = self._pool(len(probs)) if target_ids is None else target_ids
        best = pool[np.argsort(-probs[pool], kind="stable")[:top_k]]
        out = []
        for token in best.tolist():
            filled = ids.copy()
            filled[where] = token
            out.append(
                dict(
                    score=float(probs[token]),
                    token=token,
                    token_str=self.tokenizer.decode([token]).strip(),
                    sequence=self._sequence(filled),
                )
            )
        return out


@functools.cache
def _class_probabilities(model: Classifier):
    """Jitted (params, inputs [B, S]) -> class probabilities [B, C]."""
    return jax.jit(lambda params, inputs: jax.nn.softmax(model.apply({"params": params}, inputs)))


class TextClassificationPipeline(_EncoderPipeline):
    """HF's "text-classification" / "sentiment-analysis": label probabilities of a text."""

    module = Classifier

    @property
    def labels(self) -> list[str]:
        """The label names the workdir was trained with (index order)."""
        names = self.meta.get("labels") or []
        return list(names) or [str(i) for i in range(self.config.num_labels)]

    def __call__(self, inputs: str | Sequence[str], *, top_k: int | None = 1) -> list:
        """{label, score} (softmax) per text, best first.

        As HF: top_k=1 (the default) gives one dict per text (a list of one for a single
        string); top_k=None (every label) or k > 1 gives a list of dicts per text (the list
        itself for a single string).
        """
        texts, single = _texts(inputs)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: must be at least 1, or None for every label")
        ids = self._encode(texts)
        labels = self.labels
        k = len(labels) if top_k is None else min(top_k, len(labels))
        results = []
        for rows, batch in self._batches(ids):
            probs = np.asarray(_class_probabilities(self.model)(self.params, batch))
            for row in range(len(rows)):
                order = np.argsort(-probs[row], kind="stable")[:k]
                results.append([dict(label=labels[c], score=float(probs[row, c])) for c in order])
        if top_k == 1:
            return [r[0] for r in results]
        return results[0] if single else results


class TranslationPipeline:
    """HF's "translation" over a `Translator`: {"translation_text"} per text."""

    output_key = "translation_text"

    def __init__(self, translator: Translator) -> None:
        self.translator = translator

    def __call__(
        self,
        inputs: str | Sequence[str],
        *,
        num_beams: int = 1,
        length_penalty: float = 0.6,
        return_step_probs: bool = False,
        num_top: int = 5,
        **controls: Any,
    ) -> list[dict[str, Any]]:
        """One dict per text (a list of one for a single string).

        num_beams: 1 is greedy. length_penalty: beam search's GNMT exponent (tfjax's alpha;
        HF's own length_penalty divides by length**penalty instead). return_step_probs adds
        "steps": per output piece {piece, prob, alternatives: [(piece, prob)] * num_top}.
        `controls`: min_length, max_length (output pieces, eos included; at most the
        translator's max_decode_len), no_repeat_ngram_size, early_stopping (True or "never").
        """
        texts, _ = _texts(inputs)
        if "max_length" in controls:
            controls["max_decode_len"] = self._checked_max_length(controls.pop("max_length"))
        out = []
        for t in self.translator.translate(
            texts, beam_size=num_beams, alpha=length_penalty,
            num_top=num_top if return_step_probs else 0, **controls,
        ):  # fmt: skip
            result: dict[str, Any] = {self.output_key: t.text}
            if return_step_probs:
                result["steps"] = [
                    dict(piece=p, prob=float(np.exp(lp)), alternatives=alts)
                    for p, lp, alts in zip(t.pieces, t.log_probs, t.alternatives, strict=True)
                ]
            out.append(result)
        return out

    def _checked_max_length(self, value: int | None) -> int | None:
        """HF's max_length, refused in its own name when this model cannot write it."""
        if value is not None and not 1 <= value <= self.translator.max_decode_len:
            raise ValueError(
                f"max_length={value}: this model writes 1 to "
                f"{self.translator.max_decode_len} pieces"
            )
        return value


class SummarizationPipeline(TranslationPipeline):
    """HF's "summarization": {"summary_text"} per text, with HF's length warnings."""

    output_key = "summary_text"

    def __init__(self, translator: Translator) -> None:
        super().__init__(translator)
        self._warned: set[tuple] = set()  # each length warning once per setting, not per call

    def __call__(self, inputs: str | Sequence[str], **options: Any) -> list[dict[str, Any]]:
        """As `TranslationPipeline`; warns, as HF does, when max_length is below min_length
        or above the input's length in pieces (summaries are meant to be shorter). Each
        warning is given once per max_length: the CLI calls once per 512 lines of a file."""
        texts, _ = _texts(inputs)
        longest = self._checked_max_length(options.get("max_length"))
        longest = longest or self.translator.max_decode_len
        least = options.get("min_length", 0)
        if least > longest and ("min", least, longest) not in self._warned:
            self._warned.add(("min", least, longest))
            logging.warning("min_length=%d is more than max_length=%d", least, longest)
        if ("input", longest) not in self._warned:  # else no need to tokenize twice
            shortest = min(len(ids) for ids in self.translator.tokenizer.encode_batch(texts))
            if shortest < longest:
                self._warned.add(("input", longest))
                logging.warning(
                    "max_length is %d but an input is only %d pieces long; a summary is "
                    "usually shorter than its input: consider a smaller max_length",
                    longest, shortest,
                )  # fmt: skip
        return super().__call__(texts, **options)
