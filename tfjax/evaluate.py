"""Translate a split with a model's parameters and score it: sacreBLEU, chrF, exact match."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import sacrebleu
from tqdm import tqdm

from tfjax import generate
from tfjax.data import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from tfjax.model import Transformer

# Pad and bos are never a correct next token; banning them (and renormalising) keeps decoded
# outputs re-scorable by `generate.score`, which reads pad as the end of a target. One object,
# so the jitted decoders see the same static argument every call.
NEVER_EMIT = generate.ban_tokens((PAD_ID, BOS_ID))


def decoder_options(max_decode_len: int, num_top: int = 0) -> dict[str, Any]:
    """Keyword arguments of `generate.translate_*` shared by every translation of a split."""
    return dict(
        max_decode_len=max_decode_len,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_top=num_top,
        logits_processor=NEVER_EMIT,
    )


def decode_best(
    model: Transformer,
    params: Any,
    inputs: np.ndarray,
    *,
    max_decode_len: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    num_top: int = 0,
) -> Any:
    """Each sentence's best translation of a source batch [B, S], fetched to the host.

    Greedy (a `decode.DecodeOutput`) when beam_size == 1; otherwise the first of each n-best
    list: a `decode.BeamSearchOutput` with the beam axis dropped ([B, beam, ...] -> [B, ...]).
    """
    common = decoder_options(max_decode_len, num_top)
    if beam_size == 1:
        return jax.device_get(generate.translate_greedy(model, params, inputs, **common))
    out = generate.translate_beam(model, params, inputs, beam_size=beam_size, alpha=alpha, **common)
    return jax.device_get(jax.tree_util.tree_map(lambda x: x[:, 0], out))


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
        tokens = decode_best(
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
