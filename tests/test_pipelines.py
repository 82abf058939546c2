"""HF-style pipelines over trained workdirs: outputs, scores against the full forward pass."""

import io
import json

import jax
import numpy as np
import pytest

import tfjax
from tfjax import checkpoint, cli, pipelines
from tfjax.data import Tokenizer
from tfjax.model import MaskedLM
from tfjax.translator import Translator


@pytest.fixture(scope="module")
def fill_mask(mlm_workdir):
    return tfjax.pipeline("fill-mask", workdir=str(mlm_workdir), batch_size=4)


@pytest.fixture(scope="module")
def sentiment(classifier_workdir):
    return tfjax.pipeline("sentiment-analysis", workdir=str(classifier_workdir))


def test_fill_mask_scores_are_the_softmax_of_the_full_forward_pass(fill_mask, mlm_workdir):
    out = fill_mask("the film was <mask> and the plot", top_k=3)
    assert [set(r) for r in out] == [{"score", "token", "token_str", "sequence"}] * 3
    # Reference: the whole [1, S, V] logits of the restored model, softmax in NumPy.
    cfg, params, tokenizer_bytes, _ = checkpoint.restore_for_inference(mlm_workdir)
    tokenizer = Tokenizer(tokenizer_bytes)
    ids = [2, *tokenizer.encode("the film was", add_eos=False), tokenizer.mask_id]
    ids += [*tokenizer.encode("and the plot")]
    logits = np.asarray(MaskedLM(cfg).apply({"params": params}, np.array([ids])), np.float64)
    where = ids.index(tokenizer.mask_id)
    probs = np.exp(logits[0, where] - logits[0, where].max())
    probs /= probs.sum()
    real = np.arange(5, tokenizer.vocab_size)  # pad, unk, bos, eos and <mask> are not offered
    best = real[np.argsort(-probs[real])[:3]]
    assert [r["token"] for r in out] == best.tolist()
    np.testing.assert_allclose([r["score"] for r in out], probs[best], rtol=1e-5)
    assert out[0]["sequence"] == f"the film was {out[0]['token_str']} and the plot"


def test_fill_mask_several_masks_lists_and_targets(fill_mask):
    two = fill_mask("the <mask> was <mask>", top_k=2)
    assert len(two) == 2 and all(len(per_mask) == 2 for per_mask in two)
    # The other mask stays, spaced as a word.
    assert two[0][0]["sequence"] == f"the {two[0][0]['token_str']} was <mask>"
    assert two[1][0]["sequence"] == f"the <mask> was {two[1][0]['token_str']}"
    batch = fill_mask(["a <mask> film", "the <mask>", "<mask> plot"], top_k=1)
    assert len(batch) == 3 and all(len(r) == 1 for r in batch)
    alone = fill_mask("the <mask>", top_k=1)  # alone or in a batch (other program), the same
    assert batch[1][0]["token"] == alone[0]["token"]
    assert batch[1][0]["score"] == pytest.approx(alone[0]["score"], rel=1e-5)
    targeted = fill_mask("the film was <mask>", targets=["good", "bad"])
    assert {r["token_str"] for r in targeted} == {"good", "bad"}
    assert targeted[0]["score"] >= targeted[1]["score"]


def test_fill_mask_refuses_bad_input(fill_mask):
    with pytest.raises(ValueError, match="input 1 has no <mask>"):
        fill_mask(["the <mask>", "no mask here"])
    with pytest.raises(ValueError, match="input 0 is empty"):
        fill_mask("  ")
    with pytest.raises(ValueError, match="top_k"):
        fill_mask("the <mask>", top_k=0)


def test_fill_mask_compiles_a_handful_of_programs(fill_mask):
    jitted = pipelines._mask_probabilities(fill_mask.model)
    before = jitted._cache_size()
    rng = np.random.default_rng(0)
    words = "the film was and a plot cast music good bad".split()
    for _ in range(40):
        text = " ".join(rng.choice(words, size=rng.integers(1, 15)))
        fill_mask([text + " <mask>"] * rng.integers(1, 6))
    # 40 calls; rows bucketed to 1, 2, 4 (batch_size 4), lengths to 16 or 24 (the limit).
    assert jitted._cache_size() - before <= 6


def test_sentiment_labels_scores_and_hf_shapes(sentiment):
    one = sentiment("the film was superb and lovely")
    assert len(one) == 1 and set(one[0]) == {"label", "score"}
    assert one[0]["label"] == "POSITIVE"
    assert sentiment(["a bad and dull plot"])[0]["label"] == "NEGATIVE"
    every = sentiment("the plot was dull", top_k=None)
    assert [r["label"] for r in every] in (["NEGATIVE", "POSITIVE"], ["POSITIVE", "NEGATIVE"])
    assert sum(r["score"] for r in every) == pytest.approx(1.0, abs=1e-6)
    assert every[0]["score"] >= every[1]["score"]
    nested = sentiment(["good", "bad"], top_k=None)
    assert len(nested) == 2 and all(len(r) == 2 for r in nested)


def test_sentiment_is_accurate_on_the_test_split(sentiment, task_folders):
    rows = (task_folders["sentiment"] / "test.tsv").read_text().splitlines()[1:]
    labels, texts = zip(*(row.split("\t") for row in rows), strict=True)
    predicted = [r["label"] for r in sentiment(list(texts))]
    names = {"0": "NEGATIVE", "1": "POSITIVE"}
    accuracy = np.mean([names[y] == p for y, p in zip(labels, predicted, strict=True)])
    assert accuracy >= 0.75  # 60 steps; chance is 0.5


def test_over_long_input_is_truncated_with_a_warning(sentiment, caplog):
    out = sentiment(["fine", " ".join(["good"] * 200)])
    assert out[1]["label"] in ("NEGATIVE", "POSITIVE")
    # Named by its start too: the CLI splits a file into calls, so the index alone misleads.
    assert "input 1 ('good good good good good good…') has" in caplog.text
    assert "truncated to 24" in caplog.text


def test_wrong_task_and_unknown_task(mlm_workdir):
    with pytest.raises(ValueError, match="holds a masked_lm model"):
        tfjax.pipeline("text-classification", workdir=str(mlm_workdir))
    with pytest.raises(ValueError, match="unknown task 'summarise'"):
        tfjax.pipeline("summarise", workdir=str(mlm_workdir))


def test_translation_pipeline_is_the_translator(uninterrupted):
    pipe = tfjax.pipeline("translation_de_to_en", workdir=str(uninterrupted))
    sentences = ["ein mann liest ein buch", "zwei kinder spielen"]
    expected = Translator.from_workdir(uninterrupted).translate(sentences, num_top=2)
    assert [r["translation_text"] for r in pipe(sentences)] == [t.text for t in expected]
    steps = pipe(sentences[0], return_step_probs=True, num_top=2)[0]["steps"]
    assert [s["piece"] for s in steps] == expected[0].pieces
    # One sentence here, two there: other programs, equal to float32 rounding.
    np.testing.assert_allclose([s["prob"] for s in steps], np.exp(expected[0].log_probs), 1e-5)
    alternatives = [[piece for piece, _ in s["alternatives"]] for s in steps]
    assert alternatives == [[piece for piece, _ in a] for a in expected[0].alternatives]


def test_only_seq2seq_pipelines_split_rows_over_devices(mlm_workdir):
    with pytest.raises(ValueError, match="only translation and summarization split rows"):
        tfjax.pipeline("fill-mask", workdir=str(mlm_workdir), devices=jax.devices() * 2)


def test_cli_pipeline_prints_json_lines(classifier_workdir, mlm_workdir, capsys):
    status = cli.main(
        ["pipeline", "sentiment-analysis", "--workdir", str(classifier_workdir), "good", "bad"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and len(lines) == 2
    assert set(json.loads(lines[0])) == {"label", "score"}
    status = cli.main(["pipeline", "fill-mask", "--workdir", str(mlm_workdir), "no mask"])
    assert status == 1 and "has no <mask>" in capsys.readouterr().err


def test_cli_pipeline_over_a_file_in_chunks(classifier_workdir, sentiment, tmp_path, capsys):
    # More lines than one call takes: every result printed, in order, as one call gives them.
    texts = [f"the film was good {i}" for i in range(cli._CHUNK + 40)]
    texts[7] = "bad and dull"
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    args = ["pipeline", "sentiment-analysis", "--workdir", str(classifier_workdir)]
    assert cli.main([*args, "--file", str(tmp_path / "in.txt")]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == json.loads(
        json.dumps(sentiment(texts))
    )
    assert f"{len(texts)}/{len(texts)}" in err  # the progress bar reached the end


@pytest.mark.parametrize(
    "task, lines, error",
    [
        ("sentiment-analysis", ["good", "", "bad"], "in.txt: line 2 is empty"),
        ("fill-mask", ["the <mask> film", "no mask here"], "in.txt: line 2 has no <mask>"),
    ],
)
def test_cli_pipeline_names_a_bad_line_before_any_work(
    classifier_workdir, task, lines, error, tmp_path, capsys
):
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    # The workdir is not even read: the file is refused first.
    args = ["pipeline", task, "--workdir", str(tmp_path / "missing"), "--file"]
    assert cli.main([*args, str(tmp_path / "in.txt")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and error in err


@pytest.mark.parametrize("command", ["translate", "pipeline"])
def test_cli_refuses_texts_and_a_file_together(command, tmp_path, capsys):
    """Neither is dropped silently: the command stops before reading the workdir."""
    (tmp_path / "in.txt").write_text("the <mask> film\n")
    task = ["fill-mask"] if command == "pipeline" else []
    args = [command, *task, "--workdir", str(tmp_path / "missing"), "--file"]
    assert cli.main([*args, str(tmp_path / "in.txt"), "a <mask> text"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: give texts or --file {tmp_path / 'in.txt'}, not both\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_pipeline_at_a_terminal_answers_line_by_line(mlm_workdir, monkeypatch, capsys):
    """A typed line that the pipeline refuses is reported and the next one still answered."""
    monkeypatch.setattr("sys.stdin", _Terminal("no mask\n\nthe <mask> was good\n"))
    assert cli.main(["pipeline", "fill-mask", "--workdir", str(mlm_workdir)]) == 0
    out, err = capsys.readouterr()
    assert "error: " in err and "has no <mask>" in err
    (line,) = out.splitlines()
    expected = tfjax.pipeline("fill-mask", workdir=str(mlm_workdir))("the <mask> was good")
    assert json.loads(line) == json.loads(json.dumps(expected))


def test_jitted_scores_do_not_depend_on_batch_neighbours(sentiment):
    texts = ["good plot", "the film was dull and bad and poor", "a fine cast"]
    together = [r["score"] for r in sentiment(texts)]
    alone = [sentiment(t)[0]["score"] for t in texts]
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_cli_evaluate_agrees_with_the_pipeline(classifier_workdir, sentiment, task_folders, capsys):
    assert cli.main(["evaluate", "--workdir", str(classifier_workdir), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    rows = (task_folders["sentiment"] / "test.tsv").read_text().splitlines()[1:]
    labels, texts = zip(*(row.split("\t") for row in rows), strict=True)
    names = {"0": "NEGATIVE", "1": "POSITIVE"}
    predicted = [r["label"] for r in sentiment(list(texts))]
    hits = sum(names[y] == p for y, p in zip(labels, predicted, strict=True))
    assert f"test: {len(rows)} texts  accuracy {100 * hits / len(rows):.2f}%" in printed
