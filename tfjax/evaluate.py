"""Evaluate a split with a model's parameters: loss, translations, sacreBLEU, chrF, exact match,
ROUGE for summaries; for encoder-only models, masked-piece accuracy or accuracy and macro-F1.

The training loop, `Translator.evaluate` (and so `python -m tfjax evaluate`) and the quality
benchmark all go through `evaluate_split` (`evaluate_encoder_split`), so a split is
truncated, batched and decoded the same way wherever it is scored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import sacrebleu
from flax import linen as nn
from jax.sharding import Mesh
from tqdm import tqdm

from tfjax import generate, sharding, train_lib
from tfjax.data import Tokenizer, eval_dataset
from tfjax.masking import Masking
from tfjax.model import Transformer

Batch = dict[str, Any]  # eval_dataset's arrays [rows, ...], on the host or placed on a mesh


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How a split is evaluated."""

    batch_size: int  # sentences per eval batch and decoder call
    max_source_len: int  # longer sources are truncated (eos kept), with a count logged
    max_target_len: int  # references likewise, for the loss; also the longest translation
    beam_size: int = 1  # 1: greedy
    alpha: float = 0.6  # GNMT length-penalty exponent of beam search
    min_length: int = 0  # eos is banned before this many output pieces
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in an output (0: off)
    rouge: bool = False  # also ROUGE-1/2/L/Lsum and their mean (summarization)


@functools.cache
def _jitted_eval_step(model: nn.Module, masking: Masking | None = None):
    """One compiled eval step per model, reused by every evaluation."""
    return jax.jit(functools.partial(train_lib.eval_step, model=model, masking=masking))


def _loss(
    model: nn.Module, params: Any, batches: Iterable[Batch], masking: Masking | None = None
) -> dict[str, float]:
    """Per-token nll, perplexity and accuracy over eval batches (padding rows weigh 0).

    With `masking`, batch i masks with key fold_in(key(0), i): the same pieces every time.
    """
    eval_step = _jitted_eval_step(model, masking)
    totals = {"nll": 0.0, "tokens": 0.0, "correct": 0.0}
    for i, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(0), i)
        arrays = {k: v for k, v in batch.items() if k != "index"}
        m = generate.to_host(eval_step(params, arrays, rng))
        totals = {k: totals[k] + float(m[k]) for k in totals}
    tokens = max(totals["tokens"], 1.0)
    return {
        "nll": totals["nll"] / tokens,
        "perplexity": float(np.exp(min(totals["nll"] / tokens, 50.0))),
        "accuracy": totals["correct"] / tokens,
    }


def _batches(
    source: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    options: EvalOptions,
    mesh: Mesh | None,
    encoder_only: bool = False,
) -> Any:
    """The eval batches of `source`: this process's rows placed on `mesh`, or every row."""
    shard = {} if mesh else dict(process_index=0, process_count=1)
    batches = eval_dataset(
        source,
        tokenizer,
        batch_size=options.batch_size,
        max_source_len=options.max_source_len,
        max_target_len=options.max_target_len,
        encoder_only=encoder_only,
        **shard,
    )
    if mesh is not None:
        batches = batches.map(functools.partial(sharding.place_batch, mesh=mesh))
    return batches


def evaluate_split(
    model: Transformer,
    params: Any,
    tokenizer: Tokenizer,
    source: Sequence[dict[str, str]],
    options: EvalOptions,
    *,
    decode_sentences: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    decode_params: Any = None,
) -> dict[str, Any]:
    """Loss on every example of `source` ({"source", "target"} dicts), and the `scores` of
    the translations of its first `decode_sentences` (None: all; 0: no decoding), decoded
    with `decode_params` (a `generate.Replicas`, say; None: `params`).

    With a `mesh` (the trainer's), each process reads its own rows of every batch
    (options.batch_size per process) and the rows are placed on the mesh, so the loss sums
    and the decoded hypotheses are global: every process computes the same scores, and so
    makes the same best-checkpoint choice. Without one, one process reads every row.
    """
    batches = _batches(source, tokenizer, options, mesh)
    result = _loss(model, params, batches)
    wanted = len(source) if decode_sentences is None else min(decode_sentences, len(source))
    if wanted:
        rows = options.batch_size * (jax.process_count() if mesh else 1)  # per global batch
        chosen = [batches[i] for i in range(-(-wanted // rows))]
        hyps = translate_batches(
            model,
            params if decode_params is None else decode_params,
            chosen,
            tokenizer,
            max_decode_len=options.max_target_len,
            beam_size=options.beam_size,
            alpha=options.alpha,
            min_length=options.min_length,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            progress=progress,
        )
        indices = sorted(hyps)[:wanted]
        references = [source[i]["target"] for i in indices]
        result.update(scores([hyps[i] for i in indices], references))
        if options.rouge:
            result.update(rouge([hyps[i] for i in indices], references))
            result["rouge_mean"] = (result["rouge1"] + result["rouge2"] + result["rougeL"]) / 3
    return result


def translate_batches(
    model: Transformer,
    params: Any,
    batches: Iterable[Batch],
    tokenizer: Tokenizer,
    *,
    max_decode_len: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
    progress: bool = False,
) -> dict[int, str]:
    """Detokenized translations by example index, for eval batches (rows with index -1
    skipped), placed on a mesh or not; every process gets every row's translation.
    min_length and no_repeat_ngram_size as in `generate.decode_best`."""
    out: dict[int, str] = {}
    for batch in tqdm(batches, desc="translate", disable=not progress, leave=False):
        tokens = generate.decode_best(
            model,
            params,
            batch["inputs"],
            max_decode_len=max_decode_len,
            beam_size=beam_size,
            alpha=alpha,
            min_length=min_length,
            no_repeat_ngram_size=no_repeat_ngram_size,
        ).tokens  # [B, L]
        for index, row in zip(generate.to_host(batch["index"]), tokens, strict=True):
            if index >= 0:
                out[int(index)] = tokenizer.decode(row)
    return out


def scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU (13a, cased), lowercased BLEU, chrF and exact match, with BLEU's signature."""
    bleu = sacrebleu.metrics.BLEU()
    result = bleu.corpus_score(list(hypotheses), [list(references)])
    lower = sacrebleu.metrics.BLEU(lowercase=True).corpus_score(
        list(hypotheses), [list(references)]
    )
    chrf = sacrebleu.metrics.CHRF().corpus_score(list(hypotheses), [list(references)])
    exact = np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)])
    return dict(
        bleu=result.score,
        bleu_lowercase=lower.score,
        chrf=chrf.score,
        exact_match=float(exact) * 100,
        signature=str(bleu.get_signature()),
    )


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, -2, -L and -Lsum F1 (x100), the mean over examples, as the summarization
    literature reports it: Google's rouge-score with its Porter stemmer. ROUGE-Lsum takes
    the union LCS over sentences, here split after ".", "!" or "?" (nltk's punkt, which
    Hugging Face's scripts use, needs a download)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        split = ["\n".join(_SENTENCE_END.split(x.strip())) for x in (reference, hypothesis)]
        for name, score in scorer.score(*split).items():
            totals[name] += score.fmeasure
    count = max(len(hypotheses), 1)
    return {name: 100 * total / count for name, total in totals.items()}


def evaluate_encoder_split(
    model: nn.Module,
    params: Any,
    tokenizer: Tokenizer,
    source: Sequence[dict[str, Any]],
    options: EvalOptions,
    *,
    masking: Masking | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """An encoder-only model on every example of `source`.

    A Classifier ({"source", "label"} examples): nll, accuracy and macro-F1 (fractions, as the
    translation's token accuracy). A MaskedLM
    (`masking` given; {"source"} examples): nll, perplexity and accuracy of the masked pieces,
    on masks fixed per batch. `mesh` as in `evaluate_split`.
    """
    batches = _batches(source, tokenizer, options, mesh, encoder_only=True)
    if masking is not None:
        return _loss(model, params, batches, masking)
    labels, predicted, nll = _classify(model, params, batches)
    return dict(
        nll=float(np.mean(nll)),
        perplexity=float(np.exp(min(np.mean(nll), 50.0))),
        accuracy=float(np.mean(labels == predicted)),
        macro_f1=macro_f1(labels, predicted, model.config.num_labels),
    )


@functools.cache
def _jitted_classify(model: nn.Module):
    """(params, inputs [B, S], labels [B]) -> (predicted class [B], nll of the label [B])."""

    def classify(params: Any, inputs: jax.Array, labels: jax.Array):
        log_probs = jax.nn.log_softmax(model.apply({"params": params}, inputs))  # [B, C]
        nll = -jax.numpy.take_along_axis(log_probs, jax.numpy.maximum(labels, 0)[:, None], 1)
        return jax.numpy.argmax(log_probs, -1), nll[:, 0]

    return jax.jit(classify)


def _classify(model: nn.Module, params: Any, batches: Iterable[Batch]) -> tuple[np.ndarray, ...]:
    """(labels, predicted classes, nll of the label) of every real example, in split order:
    one forward pass gives the loss and the predictions."""
    classify = _jitted_classify(model)
    found: dict[int, tuple[float, ...]] = {}
    for batch in batches:
        out = classify(params, batch["inputs"], batch["label"])
        rows = zip(*generate.to_host((batch["index"], batch["label"], *out)), strict=True)
        found.update({int(i): (y, p, n) for i, y, p, n in rows if i >= 0})
    rows = np.array([found[i] for i in sorted(found)]).reshape(-1, 3)
    return rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2]


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_labels: int) -> float:
    """The unweighted mean over classes of F1; a class never seen nor predicted counts 0."""
    scores = []
    for c in range(num_labels):
        tp = np.sum((predicted == c) & (labels == c))
        denominator = np.sum(predicted == c) + np.sum(labels == c)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def describe(task: str, result: dict[str, Any]) -> str:
    """One line of a task's scores, as the trainer and `python -m tfjax evaluate` print it."""
    if task == "classification":
        return (
            f"accuracy {100 * result['accuracy']:.2f}%  macro-F1 {100 * result['macro_f1']:.2f}"
            f"  nll {result['nll']:.4f}"
        )
    if task == "masked_lm":
        return (
            f"masked-piece accuracy {100 * result['accuracy']:.2f}%  "
            f"perplexity {result['perplexity']:.2f}  nll {result['nll']:.4f}"
        )
    if task == "summarization":
        return (
            f"ROUGE-1 {result['rouge1']:.2f}  ROUGE-2 {result['rouge2']:.2f}  "
            f"ROUGE-L {result['rougeL']:.2f}  ROUGE-Lsum {result['rougeLsum']:.2f}"
        )
    return (
        f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  "
        f"exact match {result['exact_match']:.2f}%  ({result['signature']})"
    )
