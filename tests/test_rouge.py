"""ROUGE as the summarization literature reports it, checked against values worked by hand."""

import pytest

from tfjax.evaluate import rouge


def test_rouge_by_hand_one_sentence():
    # Unigrams: 5 of 6 shared both ways; bigrams: 3 of 5 (the cat, on the, the mat); the LCS
    # "the cat on the mat" is 5 long.
    got = rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(100 * 5 / 6)
    assert got["rouge2"] == pytest.approx(60.0)
    assert got["rougeL"] == pytest.approx(100 * 5 / 6)


def test_rouge_stems_and_lsum_joins_sentences():
    # Tokens after lowercasing and Porter stemming: reference "the dog ran a cat sit" (6),
    # hypothesis "cat sit the dog run" (5); "ran" and "run" stay distinct.
    got = rouge(["Cats sit. The dog runs."], ["The dog ran. A cat sits."])
    f1 = lambda hits, hyp, ref: 100 * 2 * hits / (hyp + ref)  # noqa: E731
    assert got["rouge1"] == pytest.approx(f1(4, 5, 6))  # cat, sit, the, dog
    assert got["rouge2"] == pytest.approx(f1(2, 4, 5))  # "the dog", "cat sit"
    assert got["rougeL"] == pytest.approx(f1(2, 5, 6))  # one LCS over the whole text
    # Lsum: per reference sentence, the union LCS with the hypothesis's sentences: 2 + 2.
    assert got["rougeLsum"] == pytest.approx(f1(4, 5, 6))


def test_rouge_is_the_mean_over_examples():
    pair = rouge(["a b", "c d"], ["a b", "x y"])
    assert pair["rouge1"] == pytest.approx(50.0) and pair["rouge2"] == pytest.approx(50.0)
