"""Translator: a restored checkpoint plus its tokenizer, translating and scoring text.

Requests are bucketed so that a long-running translator compiles a handful of programs: the
batch is padded up to a power of two (at most `max_batch`) and every length up to a multiple
of `LENGTH_BUCKET`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from tfjax import checkpoint, generate, recipe
from tfjax.continuous import ContinuousDecoder, bucket
from tfjax.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from tfjax.decode import DecodeOutput
from tfjax.evaluate import EvalOptions, evaluate_split
from tfjax.generate import decode_best
from tfjax.model import Transformer, TransformerConfig, with_logits_table

LENGTH_BUCKET = 16  # lengths are padded up to a multiple of this
# Continuous decoding's steps per host call at one row (fewer at more rows): a host round
# trip costs about one one-row step on 2 cores, against up to 3 steps decoded past an end.
CONTINUOUS_STEPS = 4


# eq=False: the arrays would make == ambiguous; attentions compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class Attention:
    """One sentence pair's attention weights, from a teacher-forced pass over its target.

    For a decoded translation the pass runs over its own tokens, and as the decoder is causal
    and deterministic these are the weights its decode steps used. Row t is the decoder
    predicting target piece t.
    """

    source_pieces: list[str]  # the S source pieces, eos included
    target_pieces: list[str]  # the T target (translation) pieces, eos included
    cross: np.ndarray  # float32 [layers, heads, T, S] encoder–decoder attention
    decoder_self: np.ndarray  # float32 [layers, heads, T, T] causal decoder self-attention


@dataclasses.dataclass(frozen=True)
class Translation:
    """One output sentence with its step-by-step probabilities."""

    text: str
    pieces: list[str]  # the chosen tokens (sentencepiece pieces), eos included
    log_probs: list[float]  # log p of each chosen piece
    score: float  # sum of log_probs (beam search: also length-penalised in `penalised`)
    penalised: float | None  # beam search's length-penalised score; None for greedy
    alternatives: list[list[tuple[str, float]]]  # per step: top-k (piece, probability)
    attention: Attention | None = None  # with translate(..., attention=True); else None


def length_bucket(n: int, limit: int) -> int:
    """The smallest multiple of LENGTH_BUCKET >= n, capped at limit."""
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def padded(ids: Sequence[np.ndarray], rows: int, limit: int) -> np.ndarray:
    """Token rows -> int32 [rows, length], pad after each, length a multiple of
    LENGTH_BUCKET (at most `limit`) that holds the longest row."""
    out = np.full((rows, length_bucket(max(len(x) for x in ids), limit)), PAD_ID)
    for row, x in enumerate(ids):
        out[row, : len(x)] = x[: out.shape[1]]
    return out.astype(np.int32)


def fitted(ids: np.ndarray, limit: int, noun: str, i: int, text: str) -> np.ndarray:
    """`ids` cut to `limit` (eos kept), int32, warning when cut or when a piece is <unk>.

    The warning names the text's start beside its index `i` within the call: callers that
    split a file into several calls (the CLI) would otherwise see only that index.
    """
    name = f"{noun} {i} ({text if len(text) <= 30 else text[:30].rstrip() + '…'!r})"
    if len(ids) > limit:
        logging.warning("%s has %d pieces; truncated to %d", name, len(ids), limit)
        ids = np.append(ids[: limit - 1], EOS_ID)
    if UNK_ID in ids:
        logging.warning("%s has characters outside the vocabulary", name)
    return np.asarray(ids, np.int32)


class Translator:
    """Translate and score with a model's parameters and tokenizer."""

    def __init__(
        self,
        config: TransformerConfig,
        params: Any,
        tokenizer: Tokenizer,
        *,
        max_source_len: int | None = None,
        max_decode_len: int = 128,
        max_batch: int = 32,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        """max_source_len: longer sources are truncated (None: the model's max_len);
        max_decode_len: the longest translation, eos included; max_batch: sentences per
        decoder call; devices: `translate` and `evaluate` decode each batch's rows split
        over these devices, a copy of the parameters on each (`generate.Replicas`; on a CPU,
        host devices from XLA_FLAGS=--xla_force_host_platform_device_count=N); None: on the
        parameters as given, as every other method (and evaluate's loss) does."""
        self.config = config
        self.model = Transformer(config)
        self.params = params
        self.tokenizer = tokenizer
        self.max_source_len = min(max_source_len or config.max_len, config.max_len)
        self.max_decode_len = min(max_decode_len, config.max_len)
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: a decoder call takes at least 1 sentence")
        self.max_batch = max_batch
        many = devices is not None and len(devices) > 1
        # What the decoders read: on a CPU, the output table also laid out [D, V], which
        # XLA:CPU multiplies faster at a few rows (other backends choose layouts themselves).
        on_cpu = jax.default_backend() == "cpu"
        self._step_params = with_logits_table(params) if on_cpu else params
        self._decode_params = (
            generate.Replicas.of(self._step_params, devices) if many else self._step_params
        )

    @classmethod
    def from_workdir(
        cls, workdir: str | Path, step: int | None = None, *, best: bool = False, **kwargs: Any
    ) -> Translator:
        """Restore the latest (or `step`, or the best-BLEU) checkpoint of a training workdir.

        Sources are truncated as in training (its max_source_len) unless kwargs say otherwise.
        """
        config, params, tokenizer_bytes, meta = checkpoint.restore_for_inference(
            workdir, step, best=best
        )
        trained = ml_collections.ConfigDict(meta.get("train", {}))
        if recipe.encoder_only(trained):  # its parameters have no decoder
            raise ValueError(
                f"{workdir} holds an encoder-only {recipe.task(trained)} model; translating "
                "needs an encoder-decoder one (`python -m tfjax pipeline` serves this one)"
            )
        kwargs.setdefault("max_source_len", trained.get("max_source_len"))
        return cls(config, params, Tokenizer(tokenizer_bytes), **kwargs)

    def _encode(self, sentences: Sequence[str], limit: int) -> list[np.ndarray]:
        """Texts -> ids, refusing empty ones and truncating (with a warning) over-long ones."""
        if isinstance(sentences, str):
            raise TypeError("translate() takes a list of sentences, not one string")
        for i, s in enumerate(sentences):
            if not s.strip():
                raise ValueError(f"sentence {i} is empty")
        encoded = self.tokenizer.encode_batch(list(sentences))
        return [
            fitted(ids, limit, "sentence", i, s)
            for i, (ids, s) in enumerate(zip(encoded, sentences, strict=True))
        ]

    def _batches(self, ids: list[np.ndarray]) -> Iterator[tuple[range, np.ndarray]]:
        """Yields (row indices, inputs [bucketed batch, bucketed length])."""
        for start in range(0, len(ids), self.max_batch):
            chunk = ids[start : start + self.max_batch]
            rows = bucket(len(chunk), self.max_batch)
            yield range(start, start + len(chunk)), padded(chunk, rows, self.max_source_len)

    def translate_stream(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int = 1,
        alpha: float = 0.6,
        num_top: int = 0,
        attention: bool = False,
        **controls: Any,
    ) -> Iterator[Translation]:
        """Translations in order, each batch's as soon as it is decoded. The arguments and
        every sentence are checked (empty ones refused) here, before the first is translated.

        num_top beyond the vocabulary is clamped to it, with a warning. attention: attach
        each translation's `Attention`, from one teacher-forced pass per decoded batch over
        the tokens chosen. `controls`: the decoding controls of `generate.decode_best`
        (min_length, no_repeat_ngram_size, early_stopping) and max_decode_len (at most the
        translator's own).
        """
        controls = self._controls(controls)
        if beam_size < 1:
            raise ValueError(f"beam_size={beam_size}: must be at least 1 (1 is greedy)")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha}: must be a finite number")
        if num_top < 0:
            raise ValueError(f"num_top={num_top}: must be at least 0 (0 shows no alternatives)")
        vocab = self.config.target_vocab
        if num_top > vocab:
            logging.warning(
                "num_top=%d is more than the %d-id vocabulary; using %d", num_top, vocab, vocab
            )
            num_top = vocab
        ids = self._encode(sentences, self.max_source_len)
        return self._decode(ids, beam_size, alpha, num_top, attention, controls)

    def _controls(self, controls: dict[str, Any]) -> dict[str, Any]:
        """The decoding controls checked, with max_decode_len filled in."""
        known = {"min_length", "no_repeat_ngram_size", "early_stopping", "max_decode_len"}
        if set(controls) - known:
            raise TypeError(f"unknown decoding options {sorted(set(controls) - known)}")
        longest = controls.get("max_decode_len") or self.max_decode_len
        if not 1 <= longest <= self.max_decode_len:
            raise ValueError(f"max_decode_len={longest} must be in [1, {self.max_decode_len}]")
        for name in ("min_length", "no_repeat_ngram_size"):
            if controls.get(name, 0) < 0:
                raise ValueError(f"{name}={controls[name]} must be >= 0")
        return {**controls, "max_decode_len": longest}

    def _decode(
        self,
        ids: list[np.ndarray],
        beam_size: int,
        alpha: float,
        num_top: int,
        attention: bool,
        controls: dict[str, Any],
    ) -> Iterator[Translation]:
        """Decodes checked, encoded sentences batch by batch."""
        for rows, inputs in self._batches(ids):
            out = decode_best(
                self.model,
                self._decode_params,
                inputs,
                beam_size=beam_size,
                alpha=alpha,
                num_top=num_top,
                **controls,
            )
            chosen = [out.tokens[r, : int(out.lengths[r])] for r in range(len(rows))]
            sources = [ids[i] for i in rows]
            weights = self._attention_batch(inputs, sources, chosen) if attention else None
            for r, w in enumerate(weights or [None] * len(rows)):
                yield self._translation(out, r, beam_size > 1, w)

    def source_ids(self, sentences: Sequence[str]) -> list[np.ndarray]:
        """Each sentence's source ids as the translator reads them (empty ones refused,
        long ones truncated)."""
        return self._encode(sentences, self.max_source_len)

    def continuous(self, max_rows: int | None = None) -> ContinuousDecoder:
        """A `ContinuousDecoder` of this model: greedy decoding where sentences (from
        `source_ids`) join and leave the running rows between steps; each output, turned
        into a `Translation` by `translation`, equals `translate`'s greedy one.

        max_rows: rows at most (default max_batch, rounded down to a power of two).
        """
        max_rows = max_rows or 1 << (self.max_batch.bit_length() - 1)
        vocab = self.config.target_vocab

        def start(sentences: list[np.ndarray]) -> Any:
            inputs = padded(sentences, bucket(len(sentences), max_rows), self.max_source_len)
            return generate.rolling_rows(
                self.model, self._step_params, inputs,
                max_decode_len=self.max_decode_len, source_len=self.max_source_len,
            )  # fmt: skip

        def step(cache: Any, last: np.ndarray, steps: np.ndarray, num_top: int, n: int) -> Any:
            spec = generate.translation_spec(min(num_top, vocab))
            return generate.rolling_steps(
                self.model, self._step_params, cache, last, steps, spec, n
            )

        return ContinuousDecoder(
            start, step, max_rows=max_rows, max_decode_len=self.max_decode_len,
            bos_id=BOS_ID, eos_id=EOS_ID, max_steps_per_call=CONTINUOUS_STEPS,
        )  # fmt: skip

    def translation(self, out: DecodeOutput) -> Translation:
        """A greedy `DecodeOutput` of one sentence (a `ContinuousDecoder`'s) as a
        `Translation`."""
        return self._translation(out, 0, False, None)

    def warm_up(self) -> int:
        """Compiles the greedy decoder for every bucket a request can land in (1, 2, 4, ...,
        max_batch rows by every length bucket up to max_source_len), so that no request
        waits for a compile; returns how many shapes that is."""
        lengths = self._length_buckets()
        rows = sorted({bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        controls = {"max_decode_len": self.max_decode_len}
        for r in rows:
            for length in lengths:
                ids = [np.full(length, EOS_ID, np.int32)] * r  # the content does not matter
                list(self._decode(ids, 1, 0.6, 0, False, controls))
        return len(rows) * len(lengths)

    def warm_up_continuous(self) -> int:
        """`warm_up` for `continuous` decoders of this translator (they share programs);
        returns how many programs were compiled."""
        sources = [np.full(n, EOS_ID, np.int32) for n in self._length_buckets()]
        return self.continuous().warm_up(sources)

    def _length_buckets(self) -> list[int]:
        """Every source length a padded batch can have."""
        limit = self.max_source_len
        return sorted({length_bucket(n, limit) for n in range(1, limit + 1)})

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int = 1,
        alpha: float = 0.6,
        num_top: int = 0,
        attention: bool = False,
        **controls: Any,
    ) -> list[Translation]:
        """Translate sentences (greedy when beam_size == 1); num_top alternatives per step;
        attention and `controls` as in `translate_stream`."""
        stream = self.translate_stream(
            sentences,
            beam_size=beam_size,
            alpha=alpha,
            num_top=num_top,
            attention=attention,
            **controls,
        )
        return list(stream)

    def evaluate(
        self,
        examples: Sequence[dict[str, str]],
        *,
        beam_size: int = 1,
        alpha: float = 0.6,
        progress: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """Loss and translation scores of examples ({"source", "target"} dicts, or a data
        source of them), through the training loop's own `evaluate.evaluate_split`.

        Returns its result: nll, perplexity, accuracy, sacreBLEU, lowercased BLEU, chrF,
        exact match and the BLEU signature; with rouge=True also ROUGE. `options`: the other
        `EvalOptions` fields (min_length, no_repeat_ngram_size, rouge).
        """
        options = EvalOptions(
            batch_size=self.max_batch,
            max_source_len=self.max_source_len,
            max_target_len=self.max_decode_len,
            beam_size=beam_size,
            alpha=alpha,
            **options,
        )
        return evaluate_split(
            self.model,
            self.params,
            self.tokenizer,
            examples,
            options,
            progress=progress,
            decode_params=self._decode_params,
        )

    def _piece(self, token_id: int) -> str:
        """The piece of an id; "<id N>" past the tokenizer's last, for sentencepiece may make
        fewer pieces than the model's vocab_size, and the model still scores those ids."""
        return (
            self.tokenizer.piece(token_id)
            if token_id < self.tokenizer.vocab_size
            else f"<id {token_id}>"
        )

    def _translation(
        self, out: Any, row: int, beam: bool, attention: Attention | None
    ) -> Translation:
        length = int(out.lengths[row])
        ids = [int(i) for i in out.tokens[row, :length]]
        alternatives = [
            [(self._piece(int(i)), float(p)) for i, p in zip(ids_t, probs_t, strict=True)]
            for ids_t, probs_t in zip(
                out.top_ids[row, :length], out.top_probs[row, :length], strict=True
            )
        ]
        log_probs = [float(x) for x in out.token_log_probs[row, :length]]
        return Translation(
            text=self.tokenizer.decode(ids),
            pieces=[self._piece(i) for i in ids],
            log_probs=log_probs,
            score=float(np.sum(log_probs)),
            penalised=float(out.scores[row]) if beam else None,
            alternatives=alternatives,
            attention=attention,
        )

    def score(
        self, sources: Sequence[str], targets: Sequence[str]
    ) -> list[list[tuple[str, float]]]:
        """Teacher-forced (piece, log-probability) of each target token, eos included."""
        results = []
        for inputs, _, chunk in self._pairs(sources, targets):
            tgt = padded(chunk, inputs.shape[0], self.max_decode_len)
            log_probs = np.asarray(
                generate.score(self.model, self.params, inputs, tgt, generate.translation_spec())
            )
            for row, t in enumerate(chunk):
                pieces = [self.tokenizer.piece(int(i)) for i in t]
                results.append(list(zip(pieces, log_probs[row, : len(t)].tolist(), strict=True)))
        return results

    def attention(self, sources: Sequence[str], targets: Sequence[str]) -> list[Attention]:
        """Teacher-forced attention weights of each (source, target) pair; see `Attention`."""
        results = []
        for inputs, source_chunk, target_chunk in self._pairs(sources, targets):
            results += self._attention_batch(inputs, source_chunk, target_chunk)
        return results

    def _pairs(
        self, sources: Sequence[str], targets: Sequence[str]
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
        """Checked, encoded (source, target) pairs by batch: (inputs [rows, S] as `_batches`
        pads them, the batch's source ids, its target ids)."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        source_ids = self._encode(sources, self.max_source_len)
        target_ids = self._encode(targets, self.max_decode_len)
        for rows, inputs in self._batches(source_ids):
            yield inputs, [source_ids[r] for r in rows], [target_ids[r] for r in rows]

    def _attention_batch(
        self, inputs: np.ndarray, sources: list[np.ndarray], targets: list[np.ndarray]
    ) -> list[Attention]:
        """One `generate.attention_weights` call on a bucketed batch, trimmed per sentence.

        Args:
          inputs: [rows, S] source ids as `_batches` pads them (rows >= len(sources)).
          sources, targets: each sentence's source and target ids, eos included.
        """
        # Targets padded like the sources, to a LENGTH_BUCKET multiple: few compilations.
        tgt = padded(targets, inputs.shape[0], self.max_decode_len)  # [rows, T]
        weights = generate.attention_weights(self.model, self.params, inputs, tgt)
        # Only what `Attention` keeps comes to the host: not the encoder's [rows, L, H, S, S].
        cross, decoder_self = generate.to_host((weights.cross, weights.decoder_self))
        return [
            Attention(
                source_pieces=[self._piece(int(i)) for i in s],
                target_pieces=[self._piece(int(i)) for i in t],
                cross=cross[row, :, :, : len(t), : len(s)],
                decoder_self=decoder_self[row, :, :, : len(t), : len(t)],
            )
            for row, (s, t) in enumerate(zip(sources, targets, strict=True))
        ]
