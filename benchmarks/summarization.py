"""Summarization quality of a workdir: decoding chosen on validation, test scored once; LEAD-3.

  python benchmarks/summarization.py --workdir=/tmp/samsum [--data_dir=/path/to/samsum] \
      [--settings="1,0.6,0,0;4,0.6,0,3;4,1.0,5,3"] [--average=3] [--show=3] [--test_split=test]

Each setting is "beam,alpha,min_length,no_repeat_ngram_size". Candidates: the checkpoint
(--step, default the latest), the best-ROUGE one when it is another step, and with --average=K
the mean of the last K checkpoints (as benchmarks/quality.py: <workdir>-average-K). Every
candidate and setting decodes the config's validation split; the pair with the best mean of
ROUGE-1, -2 and -L then decodes the test split (the config's, or --test_split for a run
trained with test_split=""), once.
LEAD-3 (the first three turns of each dialogue, turns being its lines) is scored on test by
the same ROUGE code (Google's rouge-score, Porter stemmer, F1 x 100).
--show prints that many test summaries with their per-step probabilities. The table is
printed and appended to benchmarks/QUALITY.md.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from candidates import candidates, saved_step
from provenance import machine

from tfjax import cli, recipe
from tfjax.evaluate import rouge
from tfjax.translator import Translator

_WORKDIR = flags.DEFINE_string("workdir", None, "a summarization workdir", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where the data is now, if it moved")
_SETTINGS = flags.DEFINE_string(
    "settings", "1,0.6,0,0;4,0.6,0,3;4,1.0,5,3", "beam,alpha,min_length,no_repeat;..."
)
_AVERAGE = flags.DEFINE_list("average", [], "K: also weigh the average of the last K checkpoints")
_TEST_SPLIT = flags.DEFINE_string("test_split", "", "the split scored once; default: the config's")
_BATCH = flags.DEFINE_integer("batch", 64, "dialogues per decoder call")
_SHOW = flags.DEFINE_integer("show", 3, "test summaries shown with step probabilities")
QUALITY = Path(__file__).with_name("QUALITY.md")


def lead3(dialogue: str) -> str:
    """The first three turns (lines) of a dialogue, joined with spaces."""
    return " ".join(line.strip() for line in dialogue.splitlines()[:3])


def _decode(translator: Translator, examples, setting: tuple) -> tuple[dict, list]:
    beam, alpha, min_length, no_repeat = setting
    outputs = translator.translate(
        [e["source"] for e in examples],
        beam_size=beam,
        alpha=alpha,
        min_length=min_length,
        no_repeat_ngram_size=no_repeat,
        num_top=3,
    )
    scores = rouge([o.text for o in outputs], [e["target"] for e in examples])
    scores["mean"] = (scores["rouge1"] + scores["rouge2"] + scores["rougeL"]) / 3
    return scores, outputs


def _name(setting: tuple) -> str:
    return "beam {}, alpha {}, min_length {}, no_repeat_ngram {}".format(*setting)


def _row(name: str, s: dict) -> str:
    return (
        f"| {name} | {s['rouge1']:.2f} | {s['rouge2']:.2f} | {s['rougeL']:.2f} | "
        f"{s['rougeLsum']:.2f} |"
    )


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    config, data = recipe.workdir_data(_WORKDIR.value, _STEP.value, _DATA_DIR.value)
    test_split = _TEST_SPLIT.value or config.test_split
    if not test_split:  # checked before the decoding, not after
        raise app.UsageError("the workdir's config has no test split: pass --test_split=NAME")
    test = data.source(test_split).examples()
    settings = [
        (int(b), float(a), int(m), int(n))
        for b, a, m, n in (s.split(",") for s in _SETTINGS.value.split(";"))
    ]
    validation = data.source(config.eval_split).examples()
    table = ["| workload | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |", "|---|---|---|---|---|"]
    best = None  # (validation scores, candidate, setting, translator)
    averages = [int(k) for k in _AVERAGE.value]
    for model, (path, kwargs) in candidates(_WORKDIR.value, averages, _STEP.value).items():
        translator = Translator.from_workdir(
            path, max_batch=_BATCH.value, max_decode_len=config.max_target_len, **kwargs
        )
        for setting in settings:
            scores, _ = _decode(translator, validation, setting)
            table.append(_row(f"{config.eval_split}: {model}, {_name(setting)}", scores))
            print(table[-1], flush=True)
            if best is None or scores["mean"] > best[0]["mean"]:
                best = (scores, model, setting, translator)
    _, model, setting, translator = best
    scores, outputs = _decode(translator, test, setting)
    table.append(
        _row(f"**{test_split}: {model}, {_name(setting)}** (chosen on validation)", scores)
    )
    lead = rouge([lead3(e["source"]) for e in test], [e["target"] for e in test])
    table.append(_row(f"{test_split}: LEAD-3", lead))
    step = _STEP.value or saved_step(_WORKDIR.value, best=False)
    lines = [
        f"### summarization: {Path(_WORKDIR.value).name}, step {step} ({datetime.date.today()})",
        f"machine: {machine()}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); versions: jax {jax.__version__}",
        "",
        *table,
    ]
    for example, out in list(zip(test, outputs, strict=True))[: _SHOW.value]:
        lines += ["", f"dialogue: {example['source']!r}", f"reference: {example['target']}"]
        lines.append(f"summary: {out.text}")
        steps = [f"{p} {np.exp(lp):.2f}" for p, lp in zip(out.pieces, out.log_probs, strict=True)]
        lines.append("steps (piece p): " + "  ".join(steps))
    print("\n".join(lines))
    with QUALITY.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
