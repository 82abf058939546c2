"""Summarization: a JSONL folder trained as a task, ROUGE in evaluation, the pipeline."""

import json

import numpy as np
import pytest
from conftest import train_in_process

import tfjax
from tfjax import checkpoint, cli
from tfjax.evaluate import rouge

NAMES = "Amanda Jerry Olivia Ben Sara Tom".split()
THINGS = "apples cookies books tickets flowers shoes".split()


@pytest.fixture(scope="module")
def samsum_like(tmp_path_factory):
    """Dialogues of two turns whose summary restates the first: "<A> bought <n> <things>."."""
    folder = tmp_path_factory.mktemp("dialogues")
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("validation", 16), ("test", 16)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                a, b = rng.choice(NAMES, 2, replace=False)
                count, thing = rng.integers(2, 9), rng.choice(THINGS)
                dialogue = f"{a}: I bought {count} {thing} today.\n{b}: Nice! Show me later."
                summary = f"{a} bought {count} {thing}."
                f.write(json.dumps({"id": str(i), "dialogue": dialogue, "summary": summary}))
                f.write("\n")
    return folder


@pytest.fixture(scope="module")
def workdir(samsum_like, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("summarizer")
    train_in_process(
        workdir, "--config.task=summarization", "--config.dataset=folder",
        f"--config.data_dir={samsum_like}", "--config.source_lang=dialogue",
        "--config.target_lang=summary", "--config.num_train_steps=60",
        "--config.eval_every=30", "--config.eval_split=validation",
        "--config.max_source_len=48", "--config.max_target_len=16",
        "--config.learning_rate=3e-3",
    )  # fmt: skip
    return workdir


def test_training_evaluates_rouge_and_keeps_the_best_by_it(workdir):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [30, 60]
    for r in evals:
        assert r["rouge_mean"] == pytest.approx((r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3)
    best = max(evals, key=lambda r: r["rouge_mean"])["step"]
    assert checkpoint.restore_for_inference(workdir, best=True)[3]["train"]["task"]
    assert (workdir / "best" / str(best)).is_dir()
    assert checkpoint.best_step(workdir) == best


def test_pipeline_output_warnings_and_min_length(workdir, caplog):
    summarize = tfjax.pipeline("summarization", workdir=str(workdir))
    dialogue = "Ben: I bought 3 books today.\nTom: Nice! Show me later."
    out = summarize(dialogue)
    assert len(out) == 1 and set(out[0]) == {"summary_text"}
    assert "a summary is usually shorter" not in caplog.text  # 16 < the dialogue's pieces
    long = summarize(dialogue, min_length=12, max_length=16, return_step_probs=True)[0]
    assert len(long["steps"]) >= 13  # 12 pieces, then eos at the earliest
    assert all(s["piece"] != "</s>" for s in long["steps"][:12])
    summarize("Ben: hi", max_length=10, min_length=12)
    assert "min_length=12 is more than max_length=10" in caplog.text
    assert "a summary is usually shorter" in caplog.text
    caplog.clear()
    summarize(["Ben: hi", "Tom: ok"], max_length=10, min_length=12)  # as the CLI's next chunk
    assert not caplog.text  # warned once, not once per call
    limit = summarize.translator.max_decode_len
    with pytest.raises(ValueError, match=f"max_length={limit + 1}: this model writes 1 to {limit}"):
        summarize(dialogue, max_length=limit + 1)
    assert not caplog.text  # refused before HF's length warnings


def test_cli_evaluate_rouge_equals_rouge_of_the_pipeline(workdir, samsum_like, capsys):
    assert cli.main(["evaluate", "--workdir", str(workdir), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(x) for x in (samsum_like / "test.jsonl").read_text().splitlines()]
    summaries = tfjax.pipeline("summarization", workdir=str(workdir))([r["dialogue"] for r in rows])
    expected = rouge([s["summary_text"] for s in summaries], [r["summary"] for r in rows])
    assert f"ROUGE-1 {expected['rouge1']:.2f}  ROUGE-2 {expected['rouge2']:.2f}" in printed
