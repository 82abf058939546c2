"""Translate a split with a model's parameters and score it: sacreBLEU, chrF, exact match."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sacrebleu
from tqdm import tqdm

from tfjax import generate
from tfjax.data import Tokenizer
from tfjax.model import Transformer


def translate_batches(
    model: Transformer,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    tokenizer: Tokenizer,
    *,
    max_decode_len: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    progress: bool = False,
) -> dict[int, str]:
    """Detokenized translations by example index, for eval batches (rows with index -1 skipped)."""
    out: dict[int, str] = {}
    for batch in tqdm(batches, desc="translate", disable=not progress, leave=False):
        tokens = generate.decode_best(
            model,
            params,
            batch["inputs"],
            max_decode_len=max_decode_len,
            beam_size=beam_size,
            alpha=alpha,
        ).tokens  # [B, L]
        for index, row in zip(batch["index"], tokens, strict=True):
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
