"""Served models: each workdir's pipeline, its request checks, and its batched model calls.

A request's JSON is checked here, in the event loop, before it is queued: a bad request
answers 422 and never reaches a batch. What a request may set (beam, top_k, ...) becomes
its job's key, so only requests with equal settings share a model call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from tfjax import pipelines
from tfjax.data import MASK_PIECE
from tfjax.translator import Translation

MAX_TEXTS = 64  # texts in one request
MAX_BEAM = 16
MAX_NUM_TOP = 50


class BadRequest(ValueError):
    """The request cannot be served as sent; answered 422 with this message."""


@dataclasses.dataclass
class Served:
    """One served workdir."""

    name: str  # as the requests name it ("model" field)
    task: str  # the training task: translation, summarization, masked_lm, classification
    pipe: Any  # its `tfjax.pipelines` pipeline
    max_len: int  # the longest input, in pieces, the model reads

    @property
    def translator(self) -> Any:
        return self.pipe.translator

    def info(self) -> dict[str, Any]:
        """What the page and GET /v1/models show of the model."""
        cfg = self.pipe.translator.config if self.seq2seq else self.pipe.config
        return dict(
            name=self.name,
            task=self.task,
            pipelines=[p for p, t in pipelines.TASKS.items() if t == self.task],
            encoder_layers=cfg.num_layers,
            decoder_layers=cfg.decoder_layers if self.seq2seq else 0,
            heads=cfg.num_heads,
            max_input_pieces=self.max_len,
        )

    @property
    def seq2seq(self) -> bool:
        return self.task in ("translation", "summarization")

    def tokens(self, texts: Sequence[str]) -> int:
        """Input pieces of `texts`, refusing any longer than the model reads."""
        tokenizer = self.translator.tokenizer if self.seq2seq else self.pipe.tokenizer
        total = 0
        for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
            # Encoder-only inputs also carry a bos piece.
            n = len(ids) + (0 if self.seq2seq else 1)
            if n > self.max_len:
                raise BadRequest(
                    f"text {i} is {n} pieces long; this model reads at most {self.max_len}"
                )
            total += n
        return total


def load(name: str, workdir: str, *, max_batch: int) -> Served:
    """The latest checkpoint of `workdir`, served as `name`."""
    task, pipe = pipelines.from_workdir(workdir, batch_size=max_batch)
    if task in ("translation", "summarization"):
        max_len = pipe.translator.max_source_len
    else:
        max_len = pipe.max_len
    return Served(name, task, pipe, max_len)


def texts_of(value: Any, field: str) -> list[str]:
    """A request's text field: one non-empty string or a list of 1..MAX_TEXTS of them."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise BadRequest(f'"{field}" must be a string or a non-empty list of strings')
    if len(texts) > MAX_TEXTS:
        raise BadRequest(f'"{field}" has {len(texts)} texts; at most {MAX_TEXTS} per request')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f'"{field}"[{i}] is {type(text).__name__}, not a string')
        if not text.strip():
            raise BadRequest(f'"{field}"[{i}] is empty')
    return texts


def _int(lowest: int, highest: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f'"{name}" must be an integer, got {value!r}')
        if not lowest <= value <= highest:
            raise BadRequest(f'"{name}" must be in [{lowest}, {highest}], got {value}')
        return value

    return check


def number(lowest: float, highest: float) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f'"{name}" must be a number, got {value!r}')
        if not lowest <= value <= highest:
            raise BadRequest(f'"{name}" must be in [{lowest}, {highest}], got {value}')
        return float(value)

    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f'"{name}" must be true or false, got {value!r}')
    return value


def _optional_int(lowest: int) -> Callable[[str, Any], int | None]:
    check = _int(lowest, 1 << 30)
    return lambda name, value: None if value is None else check(name, value)


def _targets(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(texts_of(value, name))


# The settings each kind of request takes: name -> (check, default).
DECODING = {
    "beam": (_int(1, MAX_BEAM), 1),
    "alpha": (number(0.0, 10.0), 0.6),
    "num_top": (_int(0, MAX_NUM_TOP), 0),
    "attention": (_bool, False),
    "min_length": (_int(0, 1 << 30), 0),
    "max_length": (_optional_int(1), None),
    "no_repeat_ngram_size": (_int(0, 1 << 30), 0),
}
PIPELINE_PARAMETERS = {
    "masked_lm": {"top_k": (_int(1, 1 << 30), 5), "targets": (_targets, None)},
    "classification": {"top_k": (_optional_int(1), 1)},
    "translation": DECODING,
    "summarization": DECODING,
}


def settings(given: Any, allowed: dict[str, tuple], where: str) -> tuple[tuple[str, Any], ...]:
    """The checked settings, defaults filled in, as a hashable job key (sorted pairs)."""
    if not isinstance(given, dict):
        raise BadRequest(f"{where} must be a JSON object")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    values = {
        name: check(name, given[name]) if name in given else default
        for name, (check, default) in allowed.items()
    }
    return tuple(sorted(values.items()))


def check_texts(model: Served, texts: Sequence[str], key: Hashable) -> int:
    """Refuses texts the model cannot take; returns their input pieces."""
    if model.task == "masked_lm":
        for i, text in enumerate(texts):
            if MASK_PIECE not in text:
                raise BadRequest(f"text {i} has no {MASK_PIECE}")
    options = dict(key)
    longest = options.get("max_length")
    if model.seq2seq and longest is not None and longest > model.translator.max_decode_len:
        raise BadRequest(
            f'"max_length" is {longest}; this model writes at most '
            f"{model.translator.max_decode_len} pieces"
        )
    return model.tokens(texts)


def translation_json(t: Translation) -> dict[str, Any]:
    """A `Translation` as the API's JSON: text, per-step pieces, probabilities, alternatives
    and (when computed) attention [layers][heads][target][source] as nested lists."""
    out: dict[str, Any] = dict(
        text=t.text,
        pieces=t.pieces,
        probs=np.exp(t.log_probs).tolist(),
        score=t.score,
        penalised=t.penalised,
        alternatives=[[dict(piece=p, prob=q) for p, q in step] for step in t.alternatives],
    )
    if t.attention is not None:
        out["attention"] = dict(
            source_pieces=t.attention.source_pieces,
            target_pieces=t.attention.target_pieces,
            cross=np.round(t.attention.cross, 5).tolist(),
            self=np.round(t.attention.decoder_self, 5).tolist(),
        )
    return out


def translate_runner(model: Served) -> Callable[[Hashable, Sequence[str]], list[dict]]:
    """run(key, texts) for POST /v1/translate: one `translation_json` per text."""

    def run(key: Hashable, texts: Sequence[str]) -> list[dict[str, Any]]:
        o = dict(key)
        controls = dict(min_length=o["min_length"], no_repeat_ngram_size=o["no_repeat_ngram_size"])
        if o["max_length"] is not None:
            controls["max_decode_len"] = o["max_length"]
        out = model.translator.translate(
            list(texts), beam_size=o["beam"], alpha=o["alpha"], num_top=o["num_top"],
            attention=o["attention"], **controls,
        )  # fmt: skip
        return [translation_json(t) for t in out]

    return run


def pipeline_runner(model: Served) -> Callable[[Hashable, Sequence[str]], list]:
    """run(key, texts) for POST /v1/pipeline/{task}: the pipeline's own output per text."""
    if model.seq2seq:
        translate, shape = translate_runner(model), seq2seq_shape(model)
        return lambda key, texts: [shape(r) for r in translate(key, texts)]

    def run(key: Hashable, texts: Sequence[str]) -> list[Any]:
        options = dict(key)
        if "targets" in options and options["targets"] is not None:
            options["targets"] = list(options["targets"])
        return model.pipe(list(texts), **options)

    return run


class ContinuousTranslations:
    """The continuous `batching.Engine` of a seq2seq model: greedy requests' sentences join
    its `ContinuousDecoder`'s rows; each answer equals `translate_runner`'s."""

    def __init__(self, model: Served, shape: Callable[[dict[str, Any]], Any] | None) -> None:
        """shape: a `translation_json` -> the route's answer for one text; None: itself."""
        self.translator, self.shape = model.translator, shape or (lambda result: result)
        self.decoder = model.translator.continuous()

    def accepts(self, key: Hashable) -> bool:
        o = dict(key)
        return (o["beam"], o["attention"], o["min_length"], o["no_repeat_ngram_size"]) == (
            1, False, 0, 0,
        )  # fmt: skip

    def add(self, key: Hashable, texts: Sequence[str], tag: Hashable) -> None:
        o = dict(key)
        limit = o["max_length"] or self.translator.max_decode_len
        num_top = min(o["num_top"], self.translator.config.target_vocab)
        for i, ids in enumerate(self.translator.source_ids(texts)):
            self.decoder.add(ids, (tag, i), limit=limit, num_top=num_top)

    def step(self) -> list[tuple[Hashable, Any]]:
        return [
            (tag, self.shape(translation_json(self.translator.translation(out))))
            for tag, out in self.decoder.step()
        ]

    def drop(self) -> list[Hashable]:
        return self.decoder.drop()

    @property
    def busy(self) -> int:
        return self.decoder.running + self.decoder.waiting


def seq2seq_shape(model: Served) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A `translation_json` -> the pipeline's answer: HF's output field first, then the step
    records as in POST /v1/translate."""
    field = model.pipe.output_key

    def shape(result: dict[str, Any]) -> dict[str, Any]:
        result = dict(result)
        return {field: result.pop("text"), **result}

    return shape


def generated_tokens(results: Sequence[Any]) -> int:
    """Output pieces in a call's results (seq2seq ones carry "pieces"; others generate none)."""
    return sum(len(r["pieces"]) for r in results if isinstance(r, dict) and "pieces" in r)
