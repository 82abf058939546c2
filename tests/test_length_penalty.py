"""The GNMT length penalty of beam search through every user-facing path.

`Translator.translate`, `Translator.evaluate` and `python -m tfjax translate|evaluate` take
alpha and must hand it to beam search, which picks each sentence's hypothesis by
log p / ((5 + length) / 6) ** alpha (length counts eos). The cases are sentences on which the
tiny model of the `uninterrupted` run picks differently at alpha 0 and at a large alpha; its
80 steps leave it unsure where to stop, so there are many.

The choice expected at each alpha is computed, not assumed. A sentence's candidates are the
n-best lists of `generate.translate_beam` called directly at both alphas (not through the
`generate.decode_best` that the user-facing paths share). Each candidate is re-scored with
teacher forcing (`generate.score`, a full forward pass: no beam search, no cache) and the GNMT
formula ranks them. Scoring goes by token ids rather than through `Translator.score`, which
takes text: it refuses the empty translation (eos alone) that some n-best lists hold, and a
hypothesis cut at max_decode_len has no eos for text to give back.
"""

import subprocess
import sys

import numpy as np
import pytest
from conftest import WORDS

from tfjax import generate
from tfjax.data import PAD_ID, prepare
from tfjax.translator import Translator

BEAM = 4
ALPHAS = (0.0, 2.0)  # no penalty: the short hypotheses win; a strong one: the long ones
CASES = 6  # sentences kept; the test needs at least 2
# Candidates closer than this in penalised score are a near-tie that float32 rounding between
# the cached decoder and the full forward pass could flip; such sentences are not used.
MARGIN = 1e-3


def _pool() -> list[str]:
    """Source sentences searched for cases: the training vocabulary, 1 to 8 words."""
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(64)]


def _gnmt(log_prob_sum: float, length: int, alpha: float) -> float:
    return log_prob_sum / ((5.0 + length) / 6.0) ** alpha


def _padded(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.full((len(rows), length), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _n_best(translator: Translator, sources: list[str], alpha: float) -> list[list[tuple]]:
    """Each sentence's n-best token ids (eos included when the hypothesis has one), best
    first, from `generate.translate_beam` itself."""
    source_ids = translator.tokenizer.encode_batch(sources)
    inputs = _padded(source_ids, max(len(x) for x in source_ids))
    nbest = generate.translate_beam(
        translator.model,
        translator.params,
        inputs,
        generate.translation_spec(),
        max_decode_len=translator.max_decode_len,
        beam_size=BEAM,
        alpha=alpha,
    )
    tokens, lengths = np.asarray(nbest.tokens), np.asarray(nbest.lengths)
    return [
        [tuple(tokens[row, k, : lengths[row, k]]) for k in range(BEAM) if lengths[row, k]]
        for row in range(len(sources))
    ]


def _teacher_forced(translator: Translator, pairs: list[tuple[str, tuple]]) -> list[float]:
    """log p(candidate | source), summed over its tokens, for (source, candidate ids) pairs."""
    source_ids = translator.tokenizer.encode_batch([s for s, _ in pairs])
    inputs = _padded(source_ids, max(len(x) for x in source_ids))
    targets = _padded([np.array(c) for _, c in pairs], translator.max_decode_len)
    log_probs = generate.score(
        translator.model, translator.params, inputs, targets, generate.translation_spec()
    )
    return [float(x) for x in np.asarray(log_probs).sum(axis=1)]


@pytest.fixture(scope="module")
def translator(uninterrupted) -> Translator:
    return Translator.from_workdir(uninterrupted)


@pytest.fixture(scope="module")
def cases(translator) -> tuple[list[str], dict[float, list[str]]]:
    """(sources, {alpha: the expected translation of each source}); the alphas disagree."""
    sources = _pool()
    nbest = {a: _n_best(translator, sources, a) for a in ALPHAS}
    candidates = [sorted(set(a) | set(b)) for a, b in zip(*nbest.values(), strict=True)]
    pairs = [(s, c) for s, cs in zip(sources, candidates, strict=True) for c in cs]
    sums = iter(_teacher_forced(translator, pairs))
    kept, expected = [], {a: [] for a in ALPHAS}
    for i, source in enumerate(sources):
        scored = [(next(sums), c) for c in candidates[i]]
        picks = {}
        for alpha in ALPHAS:
            ranked = sorted(((_gnmt(s, len(c), alpha), c) for s, c in scored), reverse=True)
            near_tie = len(ranked) > 1 and ranked[0][0] - ranked[1][0] < MARGIN
            # The beam's own best must be the best candidate: else it made a search error
            # that another candidate reveals, and the sentence tests the search, not alpha.
            if not near_tie and ranked[0][1] == nbest[alpha][i][0]:
                picks[alpha] = ranked[0][1]
        texts = {alpha: translator.tokenizer.decode(ids) for alpha, ids in picks.items()}
        if len(picks) == len(ALPHAS) and texts[ALPHAS[0]] != texts[ALPHAS[1]]:
            # The penalty's direction: with log-probabilities < 0, a larger alpha can only
            # move the choice to a longer hypothesis.
            assert len(picks[ALPHAS[1]]) > len(picks[ALPHAS[0]]), source
            kept.append(source)
            for alpha in ALPHAS:
                expected[alpha].append(texts[alpha])
    assert len(kept) >= 2, f"only {len(kept)} sentences where alpha changes the choice"
    return kept[:CASES], {a: texts[:CASES] for a, texts in expected.items()}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_translator_translate_applies_alpha(translator, cases, alpha):
    sources, expected = cases
    got = [t.text for t in translator.translate(sources, beam_size=BEAM, alpha=alpha)]
    assert got == expected[alpha]


def test_translate_command_applies_alpha(uninterrupted, cases):
    sources, expected = cases
    for alpha in ALPHAS:
        command = [sys.executable, "-m", "tfjax", "translate", f"--workdir={uninterrupted}"]
        command += [f"--beam={BEAM}", f"--alpha={alpha}", *sources]
        out = subprocess.run(command, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.splitlines() == expected[alpha], alpha


def test_translator_evaluate_applies_alpha(translator, cases):
    """References are the large alpha's choices: every one is matched there, none at 0."""
    sources, expected = cases
    examples = [dict(source=s, target=t) for s, t in zip(sources, expected[ALPHAS[1]], strict=True)]
    small, large = (translator.evaluate(examples, beam_size=BEAM, alpha=a) for a in ALPHAS)
    assert large["exact_match"] == 100.0 and large["bleu"] == pytest.approx(100.0)
    assert small["exact_match"] == 0.0 and small["bleu"] < large["bleu"]


def test_evaluate_command_applies_alpha(uninterrupted, cases, tmp_path):
    """`evaluate` on the cases as a prepared dataset, the large alpha's choices as references.
    A folder holding a prepared dataset is read as it is: nothing is built into the shared
    workdir."""
    sources, expected = cases
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "test.de").write_text("".join(s + "\n" for s in sources))
    (folder / "test.en").write_text("".join(t + "\n" for t in expected[ALPHAS[1]]))
    built = prepare(str(folder), source_lang="de", target_lang="en", data_dir=str(tmp_path))
    summaries = {}
    for alpha in ALPHAS:
        command = [sys.executable, "-m", "tfjax", "evaluate", f"--workdir={uninterrupted}"]
        command += [f"--beam={BEAM}", f"--alpha={alpha}", "--split=test"]
        command += [f"--data_dir={built.builder_dir}"]
        out = subprocess.run(command, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        summaries[alpha] = next(x for x in out.stdout.splitlines() if x.startswith("test:"))
    assert "exact match 100.00%" in summaries[ALPHAS[1]], summaries
    assert "exact match 0.00%" in summaries[ALPHAS[0]], summaries
