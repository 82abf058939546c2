"""Translation quality of a workdir: model and decoding chosen on validation, test scored once.

  python benchmarks/quality.py --workdir=/tmp/m30k-de-en [--data_dir=/path/to/multi30k] \
      [--average=5,10] [--beam=5] [--alphas=0.6,1.0,1.4] [--train_time="6 min"] [--hardware=...]

Candidates: the last checkpoint, the best-BLEU one (when it is another step) and the average
of the last K checkpoints for each K (written beside the workdir, to <workdir>-average-K, with
`python -m tfjax average`'s code). Each is decoded on the config's validation split greedily
and with beam search at each length penalty; the candidate and decoding with the highest
lowercased BLEU on validation are then scored on the test split (--test_split, or the
config's), once. BLEU is sacreBLEU (13a tokenization) on detokenized text, cased and with
`-lc`; chrF beside it. The validation table shows what averaging and beam search buy; the
result row (markdown, for the README) is printed and appended to benchmarks/QUALITY.md.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from candidates import candidates, saved_step

from tfjax import cli, recipe
from tfjax.translator import Translator

_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where the corpus is now, if it moved")
_AVERAGE = flags.DEFINE_list("average", ["5", "10"], "K: average the last K checkpoints")
_BEAM = flags.DEFINE_integer("beam", 5, "beam size of the beam-search decodings")
_ALPHAS = flags.DEFINE_list("alphas", ["0.6", "1.0", "1.4"], "GNMT length penalties to try")
_BATCH = flags.DEFINE_integer("batch", 128, "sentences per decoder call")
_TRAIN_TIME = flags.DEFINE_string("train_time", "", "training wall-clock, for the table")
_HARDWARE = flags.DEFINE_string("hardware", "", "where it trained, for the table")
_OUTPUT = flags.DEFINE_string("output", "", "also write every figure here as JSON")
_TEST_SPLIT = flags.DEFINE_string("test_split", "", "the split scored once; default: the config's")

RESULTS = Path(__file__).with_name("QUALITY.md")


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    workdir = _WORKDIR.value
    train, data = recipe.workdir_data(workdir, data_dir=_DATA_DIR.value)
    test_split = _TEST_SPLIT.value or train.test_split
    if not test_split:  # checked before hours of decoding, not after
        raise app.UsageError("the workdir's config has no test split: pass --test_split=NAME")
    test_source = data.source(test_split)
    val = data.source(train.eval_split).examples()
    decodings = [(1, 0.0)] + [(_BEAM.value, float(a)) for a in _ALPHAS.value]
    rows, best = [], None
    for name, (path, kwargs) in candidates(workdir, [int(k) for k in _AVERAGE.value]).items():
        translator = Translator.from_workdir(path, max_batch=_BATCH.value, **kwargs)
        for beam, alpha in decodings:
            tick = time.perf_counter()
            result = translator.evaluate(val, beam_size=beam, alpha=alpha)
            seconds = time.perf_counter() - tick
            rows.append(dict(model=name, beam=beam, alpha=alpha, seconds=seconds, **result))
            print(
                f"{train.eval_split} {name:<11} beam {beam} alpha {alpha:.1f}: "
                f"BLEU {result['bleu']:.2f}  lowercased {result['bleu_lowercase']:.2f}  "
                f"chrF {result['chrf']:.2f}  ({seconds:.1f} s)",
                flush=True,
            )
            if best is None or result["bleu_lowercase"] > best[0]["bleu_lowercase"]:
                best = (result, name, path, kwargs, beam, alpha, translator)

    _, name, path, kwargs, beam, alpha, translator = best
    test = translator.evaluate(test_source.examples(), beam_size=beam, alpha=alpha)
    params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(translator.params))
    step = saved_step(path, best=kwargs.get("best", False))
    direction = f"{train.source_lang}→{train.target_lang}"
    corpus = Path(train.data_dir).name or train.dataset
    row = (
        f"| {corpus} {test_split} | {direction} | {params / 1e6:.1f}M "
        f"| {step} | {_TRAIN_TIME.value or '?'} | {_HARDWARE.value or platform.machine()} "
        f"| {name}, beam {beam}, alpha {alpha:.1f} | {test['bleu_lowercase']:.2f} "
        f"| {test['bleu']:.2f} | {test['chrf']:.2f} |"
    )
    header = (
        "| data | direction | params | steps | wall-clock | hardware | model, decoding "
        "| BLEU -lc | sacreBLEU | chrF |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    print(f"\n{test_split} (scored once): {test['signature']}\n{header}\n{row}")
    stamp = datetime.date.today().isoformat()
    beams = " | ".join(f"beam {_BEAM.value} α {a}" for a in _ALPHAS.value)
    table = [f"| model | greedy | {beams} |", "|---|" + "---|" * len(decodings)]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = [f"{r['bleu_lowercase']:.2f}" for r in rows if r["model"] == model]
        table.append(f"| {model} | " + " | ".join(cells) + " |")
    with RESULTS.open("a") as f:  # One write: several runs may append at once.
        f.write(
            f"\n### {direction} {corpus}, {stamp}, jax {jax.__version__}\n\n"
            f"validation ({train.eval_split}), lowercased BLEU:\n\n" + "\n".join(table) + "\n"
            f"\ntest, scored once ({test['signature']}):\n\n{header}\n{row}\n"
        )
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(
            json.dumps(
                dict(validation=rows, test=test, row=row, chosen=name, path=path, **kwargs),
                indent=1,
            )
        )


if __name__ == "__main__":
    app.run(main)
