"""Quality of an encoder-only workdir: a classifier's accuracy, or a masked LM's scores.

  python benchmarks/encoder_quality.py --workdir=/tmp/sst2 --split=dev --reference=84.0
  python benchmarks/encoder_quality.py --workdir=/tmp/chnsenticorp --split=test \
      --reference=91.07 --unseen [--best]
  python benchmarks/encoder_quality.py --workdir=/tmp/wikitext2-mlm --split=test --pppl_lines=100

Classifier: accuracy and macro-F1 of the last checkpoint (or --step, or with --best the one
the trainer kept as best on its evaluation split) on the split (every row), and with --unseen
also on the rows whose sentence is not in the training split (ChnSentiCorp's test shares rows
with its train). Masked LM: the masked-piece accuracy and
perplexity of the training loop's evaluation (15% of pieces, masks fixed per batch), the
pseudo-perplexity (Salazar et al. 2020: every piece masked in turn, exp of the mean negative
log-probability) of the first --pppl_lines texts, and fill-mask examples. The table is
printed and appended to benchmarks/QUALITY.md.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from provenance import machine

from tfjax import checkpoint, cli, evaluate, recipe
from tfjax.data import BOS_ID, Tokenizer
from tfjax.masking import Masking
from tfjax.model import MaskedLM
from tfjax.pipelines import pipeline

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "a classification or masked_lm workdir", required=True
)
_SPLIT = flags.DEFINE_string("split", "test", "the split to score")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_BEST = flags.DEFINE_bool("best", False, "the best checkpoint on the evaluation split instead")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where the data is now, if it moved")
_REFERENCE = flags.DEFINE_float("reference", 0.0, "published accuracy (%) to compare with")
_UNSEEN = flags.DEFINE_bool("unseen", False, "also score the rows whose text is not in train")
_PPPL_LINES = flags.DEFINE_integer("pppl_lines", 100, "texts for the pseudo-perplexity")
_EXAMPLES = (
    "The cat sat on the <mask> .",
    "A man is riding a <mask> down the street .",
    "This movie is <mask> .",
    "The film was a <mask> of time .",
)
QUALITY = Path(__file__).with_name("QUALITY.md")


def _header() -> list[str]:
    return [
        f"machine: {machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s)",
        f"versions: jax {jax.__version__}; {datetime.date.today()}",
    ]


def _classifier_rows(config, data, model, params, tokenizer) -> list[tuple]:
    options = recipe.eval_options(config)
    examples = data.source(_SPLIT.value).examples()
    rows = []
    result = evaluate.evaluate_encoder_split(model, params, tokenizer, examples, options)
    reference = _REFERENCE.value or None
    rows.append((f"{_SPLIT.value}, all {len(examples)} rows", result, reference))
    if _UNSEEN.value:
        seen = {e["source"] for e in data.source("train").examples()}
        unseen = [e for e in examples if e["source"] not in seen]
        result = evaluate.evaluate_encoder_split(model, params, tokenizer, unseen, options)
        rows.append((f"{_SPLIT.value}, {len(unseen)} rows not in train", result, None))
    lines = [
        "| workload | accuracy % | macro-F1 % | reference % | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, r, ref in rows:
        ratio = f"{100 * r['accuracy'] / ref:.3f}" if ref else "-"
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['macro_f1']:.2f} | "
            f"{ref if ref else '-'} | {ratio} |"
        )
    return lines


@functools.cache
def _piece_log_probs(model: MaskedLM):
    def log_probs(params, inputs, positions, targets):
        logits = model.apply({"params": params}, inputs, predict_positions=positions)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

    return jax.jit(log_probs)


def pseudo_perplexity(model, params, tokenizer: Tokenizer, texts, max_len: int) -> float:
    """exp(-mean over pieces of log p(piece | the text with that piece masked))."""
    total, count = 0.0, 0
    for text in texts:
        ids = np.concatenate([[BOS_ID], tokenizer.encode(text)])[:max_len]
        pieces = np.flatnonzero(ids >= 4)  # real pieces only; bos and eos are not scored
        if not len(pieces):
            continue
        rows = np.repeat(ids[None], len(pieces), 0)  # [n, S]: row j masks piece j
        rows[np.arange(len(pieces)), pieces] = tokenizer.mask_id
        log_p = _piece_log_probs(model)(
            params, rows, pieces[:, None], ids[pieces][:, None]
        )  # [n, 1]
        total += float(np.sum(log_p))
        count += len(pieces)
    return float(np.exp(-total / count))


def _masked_lm_rows(config, data, model, params, tokenizer) -> list[str]:
    options = recipe.eval_options(config)
    examples = data.source(_SPLIT.value).examples()
    masking = Masking(tokenizer.mask_id, tokenizer.vocab_size, rate=config.mask_rate)
    result = evaluate.evaluate_encoder_split(
        model, params, tokenizer, examples, options, masking=masking
    )
    texts = [e["source"] for e in examples[: _PPPL_LINES.value]]
    pppl = pseudo_perplexity(model, params, tokenizer, texts, config.max_source_len)
    lines = ["| workload | figure |", "|---|---|"]
    lines.append(
        f"| {_SPLIT.value} ({len(examples)} texts): masked-piece accuracy | "
        f"{100 * result['accuracy']:.2f}% |"
    )
    lines.append(
        f"| {_SPLIT.value}: perplexity of the masked pieces | {result['perplexity']:.2f} |"
    )
    lines.append(f"| {_SPLIT.value}, first {len(texts)} texts: pseudo-perplexity | {pppl:.2f} |")
    fill = pipeline("fill-mask", _WORKDIR.value, step=_STEP.value, best=_BEST.value)
    lines += ["", "| input | top 3 (score) |", "|---|---|"]
    for text in _EXAMPLES:
        best = fill(text, top_k=3)
        shown = ", ".join(f"{r['token_str']} ({r['score']:.3f})" for r in best)
        lines.append(f"| {text} | {shown} |")
    return lines


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    config, data = recipe.workdir_data(_WORKDIR.value, _STEP.value, _DATA_DIR.value)
    cfg, params, tokenizer_bytes, _ = checkpoint.restore_for_inference(
        _WORKDIR.value, _STEP.value, best=_BEST.value
    )
    tokenizer = Tokenizer(tokenizer_bytes)
    task = recipe.task(config)
    model = recipe.build_model(task, cfg)
    step = f"step {_STEP.value}" if _STEP.value else "latest checkpoint"
    if _BEST.value:  # chosen on the evaluation split, as the trainer kept it
        step = f"best checkpoint (step {checkpoint.best_step(_WORKDIR.value)})"
    title = f"### {task}: {Path(_WORKDIR.value).name}, {step}, {_SPLIT.value} split"
    rows = (_classifier_rows if task == "classification" else _masked_lm_rows)(
        config, data, model, params, tokenizer
    )
    text = "\n".join([title, *_header(), "", *rows])
    print(text)
    with QUALITY.open("a") as f:
        f.write("\n" + text + "\n")


if __name__ == "__main__":
    app.run(main)
