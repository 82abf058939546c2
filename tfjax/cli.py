"""`python -m tfjax translate|evaluate|average|distill-data|precompile`: the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

from etils import epath
from tqdm import tqdm

from tfjax import checkpoint
from tfjax.translator import Translation, Translator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tfjax")
    commands = parser.add_subparsers(dest="command", required=True)

    def restore_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workdir", required=True, help="a training workdir")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        p.add_argument("--best", action="store_true", help="the best-BLEU checkpoint")
        p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy")
        p.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty")
        p.add_argument("--batch", type=int, default=32, help="sentences per decoder call")

    translate = commands.add_parser("translate", help="translate sentences")
    restore_args(translate)
    translate.add_argument("sentences", nargs="*", help="text; none: lines of --file or stdin")
    translate.add_argument("--file", default=None, help="translate the lines of this file")
    translate.add_argument(
        "--show-probs", type=int, default=0, metavar="K", help="print top-K per step"
    )

    average = commands.add_parser("average", help="average the last K checkpoints' parameters")
    average.add_argument("--workdir", required=True, help="a training workdir")
    average.add_argument("--last", type=int, default=5, help="how many checkpoints (K)")
    average.add_argument("--output", required=True, help="workdir to write the average to")

    distill = commands.add_parser(
        "distill-data",
        help="a folder dataset whose training targets are a teacher's translations",
    )
    restore_args(distill)
    distill.set_defaults(beam=4, batch=64)
    distill.add_argument("--output", required=True, help="folder to write <split>.<lang> into")
    distill.add_argument("--data_dir", default=None, help="where the data is now, if it moved")

    commands.add_parser(
        "precompile",
        help="compile the train step and decoder for a topology; "
        "--config=FILE --topology=cpu:N|v5e:2x4 [--config.key=value ...]",
    )  # parsed by _precompile, with absl flags; listed here for --help
    evaluate = commands.add_parser("evaluate", help="translate a split and score it")
    restore_args(evaluate)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--data_dir", default=None, help="where the data is now, if it moved")
    return parser


def _lines(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(sentences, whether to show progress)."""
    if args.sentences:
        return list(args.sentences), False
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f], True
    return [line.rstrip("\n") for line in sys.stdin], False


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def probability_table(translation: Translation) -> str:
    """Per step: the chosen piece, its probability, and the top-k alternatives."""
    lines = [f"{'step':>4}  {'chosen':<14} {'p':>6}   alternatives"]
    for t, (piece, log_p) in enumerate(zip(translation.pieces, translation.log_probs, strict=True)):
        alternatives = "  ".join(f"{a} {p:.3f}" for a, p in translation.alternatives[t])
        lines.append(f"{t:>4}  {piece:<14} {2.718281828459045**log_p:>6.3f}   {alternatives}")
    return "\n".join(lines)


def _translate(args: argparse.Namespace) -> None:
    translator = Translator.from_workdir(
        args.workdir, args.step, best=args.best, max_batch=args.batch
    )
    sentences, progress = _lines(args)
    bar = tqdm(total=len(sentences), desc="translate", disable=not progress)
    for chunk in _chunks(sentences, args.batch):
        for translation in translator.translate(
            chunk, beam_size=args.beam, alpha=args.alpha, num_top=args.show_probs
        ):
            print(translation.text, flush=True)
            if args.show_probs:
                print(probability_table(translation), end="\n\n")
        bar.update(len(chunk))
    bar.close()


def _evaluate(args: argparse.Namespace) -> None:
    from tfjax import trainer

    _, data = trainer.workdir_data(args.workdir, args.step, args.data_dir)
    source = data.source(args.split)
    translator = Translator.from_workdir(
        args.workdir, args.step, best=args.best, max_batch=args.batch
    )
    examples = [source[i] for i in range(len(source))]
    result = translator.evaluate(examples, beam_size=args.beam, alpha=args.alpha, desc=args.split)
    print(
        f"{args.split}: {len(examples)} sentences  BLEU {result['bleu']:.2f}  "
        f"(lowercased {result['bleu_lowercase']:.2f})  chrF {result['chrf']:.2f}  "
        f"exact match {result['exact_match']:.2f}%\nsacreBLEU signature: {result['signature']}"
    )


def _distill_data(args: argparse.Namespace) -> None:
    """Sequence-level distillation data (Kim & Rush 2016): the teacher translates train.

    Every split of the teacher's dataset is written as <split>.<source lang> and
    <split>.<target lang>; train's targets are the teacher's beam-search translations, the
    other splits keep their references. Pairs whose translation is empty are left out.
    """
    from tfjax import trainer

    train, data = trainer.workdir_data(args.workdir, args.step, args.data_dir)
    translator = Translator.from_workdir(
        args.workdir, args.step, best=args.best, max_batch=args.batch
    )
    out = epath.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for split in data.split_sizes:
        source = data.source(split)
        pairs = [(e["source"], e["target"]) for e in (source[i] for i in range(len(source)))]
        if split == "train":
            pairs = _teacher_pairs(translator, pairs, args)
        (out / f"{split}.{train.source_lang}").write_text("".join(s + "\n" for s, _ in pairs))
        (out / f"{split}.{train.target_lang}").write_text("".join(t + "\n" for _, t in pairs))
        print(f"{split}: {len(pairs)} pairs", flush=True)
    print(f"wrote {out}: train with --config.dataset=folder --config.data_dir={out}")


def _teacher_pairs(
    translator: Translator, pairs: list[tuple[str, str]], args: argparse.Namespace
) -> list[tuple[str, str]]:
    """(source, the teacher's translation) for each pair; empty translations dropped."""
    out = []
    for chunk in tqdm(list(_chunks(pairs, args.batch)), desc="teacher"):
        sources = [s for s, _ in chunk]
        translations = translator.translate(sources, beam_size=args.beam, alpha=args.alpha)
        out.extend((s, t.text) for s, t in zip(sources, translations, strict=True) if t.text)
    if len(out) < len(pairs):
        print(f"left out {len(pairs) - len(out)} pairs whose translation was empty")
    return out


def _average(args: argparse.Namespace) -> None:
    steps = checkpoint.average_checkpoints(args.workdir, args.output, args.last)
    print(f"averaged steps {steps} into {args.output}/checkpoints/{steps[-1]}")


def _precompile(argv: Sequence[str]) -> int:
    """precompile --config=FILE --topology=NAME [--config.key=value ...]: see tfjax.precompile.

    Exits 1 when a program does not fit in a device's memory, 2 on a bad topology or mesh.
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", flag_values=fv)
    flags.DEFINE_string("topology", None, "cpu:N or a TPU topology, e.g. v5e:2x4", flag_values=fv)
    flags.DEFINE_integer(
        "beam", 0, "decoder beam size; 0: the config's eval_beam_size, at least 2", flag_values=fv
    )
    flags.DEFINE_float(
        "memory_gib", None, "memory per device, overriding the chip's", flag_values=fv
    )
    flags.DEFINE_float(
        "peak_tflops", None, "peak FLOP/s per device, overriding the chip's", flag_values=fv
    )
    flags.DEFINE_bool(
        "search_batch", False, "also find the largest batch per shard that fits", flag_values=fv
    )
    flags.mark_flags_as_required(["config", "topology"], flag_values=fv)
    try:
        fv(["precompile", *argv])
    except (flags.Error, AttributeError, KeyError, ValueError) as e:  # a bad flag or config key
        print(f"error: {e}", file=sys.stderr)
        return 2
    _simulated_devices(fv.topology)
    from tfjax import precompile

    config = fv.config
    beam = fv.beam or max(config.eval_beam_size, 2)
    try:
        target = precompile.get_target(fv.topology, fv.memory_gib, fv.peak_tflops)
        mesh, reports = precompile.precompile(config, target, beam)
    except precompile.PrecompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(precompile.describe(target, mesh), flush=True)
    for report in reports:
        print("\n" + precompile.format_report(report, target), flush=True)
    if fv.search_batch:
        print("\n" + _search_batch(config, target, reports[0]), flush=True)
    problems = precompile.too_big(reports, target)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _simulated_devices(topology: str) -> None:
    """cpu:N: ask XLA for N host devices (read when JAX starts its CPU backend)."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # compile-only: never claim an accelerator
    if topology.startswith("cpu:") and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = topology.removeprefix("cpu:")
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _search_batch(config, target, train) -> str:
    from tfjax import precompile

    def probe(rows: int, report) -> None:
        verdict = "fits" if report.fits(target) else "does not fit"
        size = f"{report.total_bytes / 2**30:.2f} GiB" if not report.error else report.error
        print(f"  {rows} rows per shard: {size}, {verdict}", flush=True)

    print("searching the largest train batch (a compile per probe):", flush=True)
    rows, fits, over = precompile.largest_batch(config, target, known=train, on_probe=probe)
    lines = [f"largest train batch per batch shard that fits: {rows} rows"]
    if fits is not None:
        lines.append(f"  {rows} rows: {precompile.format_report(fits, target)}")
    if over is not None:
        lines.append(f"  {rows + 1} rows: {precompile.format_report(over, target)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["precompile"]:  # absl flags: it takes --config.key=value overrides
        return _precompile(argv[1:])
    args = _parser().parse_args(argv)
    checkpoint.quiet_library_logs()
    try:
        commands = {
            "translate": _translate,
            "evaluate": _evaluate,
            "average": _average,
            "distill-data": _distill_data,
        }
        commands[args.command](args)
    except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
