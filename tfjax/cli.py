"""`python -m tfjax train|translate|evaluate|pipeline|serve|average|distill-data|precompile`:
the command line.

Every command is parsed here, with argparse; the two that take a recipe (`train`,
`precompile`) read `--config=FILE` plus `--config.KEY=VALUE` overrides through
ml_collections, as a Flax example's main does. Errors print one line, `error: ...`, and exit
non-zero; set TFJAX_TRACEBACK=1 to see the Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from absl import logging
from tqdm import tqdm

# Commands whose recipe takes --config.KEY=VALUE overrides after the known arguments.
_RECIPE_COMMANDS = ("train", "precompile")
# The smallest value of each numeric argument of the other commands, checked before any work.
_LOWEST = {
    "beam": 1, "batch": 1, "show_probs": 0, "last": 1, "min_length": 0,
    "no_repeat_ngram_size": 0, "max_length": 1, "max_batch": 1, "max_tokens": 1,
    "max_queue": 1, "port": 0, "cpu_devices": 1,
}  # fmt: skip
_HIGHEST = {"port": 65535}


class CommandError(Exception):
    """A command failed in a way its message explains; the exit status rides along."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tfjax")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train (or resume) a model; --config.KEY=VALUE overrides the recipe"
    )
    train.add_argument("--config", required=True, help="a configs/*.py recipe")
    train.add_argument("--workdir", required=True, help="checkpoints, tokenizer and logs")

    def restore_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workdir", required=True, help="a training workdir")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        p.add_argument("--best", action="store_true", help="the best-BLEU checkpoint")
        p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy")
        p.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty")
        p.add_argument("--batch", type=int, default=32, help="sentences per decoder call")

    def devices_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cpu_devices",
            type=int,
            default=1,
            metavar="N",
            help="split the CPU into N XLA host devices and each batch's rows over them",
        )

    def decoding_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--min_length", type=int, default=0, help="pieces before eos may come")
        p.add_argument(
            "--no_repeat_ngram_size", type=int, default=0, help="no n-gram twice; 0: off"
        )

    translate = commands.add_parser("translate", help="translate sentences")
    restore_args(translate)
    devices_arg(translate)
    translate.add_argument("sentences", nargs="*", help="text; none: lines of --file or stdin")
    translate.add_argument("--file", default=None, help="translate the lines of this file")
    translate.add_argument(
        "--show-probs", type=int, default=0, metavar="K", help="print top-K per step"
    )
    translate.add_argument(
        "--plot-attention",
        default=None,
        metavar="FILE",
        help="draw the first translation's cross-attention to FILE (.png, .svg or .pdf)",
    )
    translate.add_argument(
        "--plot-layer", type=int, default=-1, metavar="N", help="decoder layer, 0 first; -1: last"
    )
    translate.add_argument(
        "--plot-heads",
        choices=("mean", "all"),
        default="mean",
        help="the mean over the layer's heads, or one panel per head",
    )

    evaluate = commands.add_parser("evaluate", help="translate a split and score it")
    restore_args(evaluate)
    decoding_args(evaluate)
    devices_arg(evaluate)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--data_dir", default=None, help="where the data is now, if it moved")

    pipe = commands.add_parser(
        "pipeline",
        help="run a task pipeline (fill-mask, text-classification, sentiment-analysis, "
        "translation, summarization) over texts; prints one JSON result per text",
    )
    pipe.add_argument(
        "task",
        help="fill-mask, text-classification, sentiment-analysis, translation, summarization",
    )
    pipe.add_argument("--workdir", required=True, help="a training workdir of that task")
    pipe.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    pipe.add_argument("--best", action="store_true", help="the best checkpoint")
    pipe.add_argument("--batch", type=int, default=32, help="texts per model call")
    devices_arg(pipe)
    pipe.add_argument("sentences", nargs="*", help="texts; none: lines of --file or stdin")
    pipe.add_argument("--file", default=None, help="the texts are the lines of this file")
    pipe.add_argument(
        "--top_k", type=int, default=None, help="fill-mask: 5; classification: 1 (0: all)"
    )
    pipe.add_argument("--targets", default=None, help="fill-mask: comma-separated candidates")
    pipe.add_argument("--beam", type=int, default=1, help="translation, summarization: beam")
    pipe.add_argument("--max_length", type=int, default=None, help="summarization: pieces")
    decoding_args(pipe)
    pipe.add_argument(
        "--show-probs",
        type=int,
        default=0,
        metavar="K",
        help="translation, summarization: top-K per step",
    )

    serve = commands.add_parser(
        "serve", help="serve workdirs over HTTP with dynamic batching, a page and metrics"
    )
    serve.add_argument("--workdir", action="append", default=[], help="a workdir to serve")
    serve.add_argument(
        "--model", action="append", default=[], metavar="NAME=DIR", help="a named workdir"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="0: any free port")
    serve.add_argument("--max_batch", type=int, default=32, help="sentences per model call")
    serve.add_argument("--max_tokens", type=int, default=4096, help="input pieces per call")
    serve.add_argument("--max_wait_ms", type=float, default=5.0, help="wait for company")
    serve.add_argument(
        "--batching", choices=("continuous", "calls"), default="continuous",
        help="continuous: greedy requests join the running batch between decoder steps; "
        "calls: every request waits for a whole-batch decoder call",
    )  # fmt: skip
    serve.add_argument("--max_queue", type=int, default=256, help="queued requests before 429")
    serve.add_argument("--timeout", type=float, default=60.0, help="seconds before 504")
    serve.add_argument(
        "--warmup", action="store_true", help="compile every batch size before listening"
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

    precompile = commands.add_parser(
        "precompile",
        help="compile the train step and decoder for a TPU topology or cpu:N; exits 1 when a "
        "program does not fit, 2 on a bad topology, mesh or recipe",
    )
    precompile.add_argument("--config", required=True, help="a configs/*.py recipe")
    precompile.add_argument(
        "--topology", required=True, help="cpu:N or a TPU topology, e.g. v5e:2x4"
    )
    precompile.add_argument(
        "--beam", type=int, default=0, help="decoder beam; 0: eval_beam_size, at least 2"
    )
    precompile.add_argument("--memory_gib", type=float, default=None, help="memory per device")
    precompile.add_argument("--peak_tflops", type=float, default=None, help="FLOP/s per device")
    precompile.add_argument(
        "--search_batch", action="store_true", help="also find the largest batch that fits"
    )
    return parser


def load_config(path: str, overrides: Sequence[str] = ()) -> object:
    """The ConfigDict of a configs/*.py recipe with --config.KEY=VALUE overrides applied."""
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(path):
        what = "a folder, not a recipe file" if os.path.isdir(path) else "no such recipe file"
        raise CommandError(f"{path}: {what}", status=2)
    argv = ["tfjax", f"--config={path}", *overrides]
    values = flags.FlagValues()
    # sys_argv: the overrides are read from these arguments, not from this process's sys.argv.
    config_flags.DEFINE_config_file(
        "config", None, "recipe", flag_values=values, lock_config=True, sys_argv=argv
    )
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as e:
        raise CommandError(f"{path}: {_one_line(e)}", status=2) from e
    except Exception as e:  # the recipe's own code failed: name its line, not ours
        raise CommandError(f"{_recipe_line(path, e)}: {type(e).__name__}: {e}", status=2) from e
    return values.config


def _recipe_line(path: str, error: Exception) -> str:
    """path:LINE of the innermost frame of `error` in the recipe file (path alone if none)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{path}:{error.lineno}"
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.abspath(frame.filename) == os.path.abspath(path)
    ]
    return f"{path}:{lines[-1]}" if lines else path


def _one_line(error: BaseException) -> str:
    """ml_collections' message for a bad override, on one line: it wraps a KeyError (an
    unknown field, with a "Did you mean" line) in another exception."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        name, *rest = error.args[0].splitlines()
        return "; ".join([f"unknown field {name}", *rest])
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def quiet_library_logs() -> None:
    """Hide Orbax's and grain's INFO chatter and read-only notices; keep real warnings."""

    def keep(record: std_logging.LogRecord) -> bool:
        noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
        message = record.getMessage()
        routine = (
            record.levelno < std_logging.WARNING or "read only" in message or "read_only" in message
        )
        return not (noisy and routine)

    logging.get_absl_handler().addFilter(keep)
    std_logging.getLogger("absl").addFilter(keep)


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    config = load_config(args.config, overrides)
    from tfjax import recipe

    recipe.validate(config)  # the trainer checks too; here the error is the only output line
    # Progress lines (checkpoints, evaluations) are INFO logs, on stderr as under absl.app.
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    import jax

    from tfjax import trainer

    logging.info("JAX devices: %s", jax.devices())
    trainer.train_and_evaluate(config, args.workdir)
    return 0


def _translator(args: argparse.Namespace, **kwargs):
    from tfjax.translator import Translator

    return Translator.from_workdir(
        args.workdir, args.step, best=args.best, max_batch=args.batch, **kwargs
    )


def _cpu_devices(n: int) -> list | None:
    """N XLA host devices for `Translator(devices=...)`; None for 1. The flag must be set
    before JAX starts its backend, which this command has not done yet."""
    if n == 1:
        return None
    _ask_host_devices(n)
    import jax

    devices = jax.devices("cpu")
    if len(devices) != n:  # the backend had started (an in-process caller), or XLA_FLAGS wins
        raise CommandError(f"--cpu_devices {n}: JAX runs {len(devices)} CPU devices here")
    return devices


def _lines(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(sentences, whether to show progress)."""
    if args.sentences and args.file:  # one of the two would be dropped without a word
        raise CommandError(f"give texts or --file {args.file}, not both", status=2)
    if args.sentences:
        return list(args.sentences), False
    if args.file:
        with open(args.file, "rb") as f:
            return _utf8_lines(f.read(), args.file), True
    return _utf8_lines(sys.stdin.buffer.read(), "<stdin>"), False


def _utf8_lines(data: bytes, name: str) -> list[str]:
    """The lines of `data`, split where a text file's are, naming a line that is not UTF-8."""
    lines = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CommandError(
                f"{name}: line {number} is not UTF-8 ({e.reason} at byte {e.start + 1})"
            ) from e
    return lines


def probability_table(translation) -> str:
    """Per step: the chosen piece, its probability, and the top-k alternatives."""
    lines = [f"{'step':>4}  {'chosen':<14} {'p':>6}   alternatives"]
    for t, (piece, log_p) in enumerate(zip(translation.pieces, translation.log_probs, strict=True)):
        alternatives = "  ".join(f"{a} {p:.3f}" for a, p in translation.alternatives[t])
        lines.append(f"{t:>4}  {piece:<14} {2.718281828459045**log_p:>6.3f}   {alternatives}")
    return "\n".join(lines)


def _translate(args: argparse.Namespace) -> int:
    plot = args.plot_attention is not None
    if plot:
        _check_plot(args.plot_attention)
    if not plot and _typed(args):
        return _translate_typed(args)
    sentences, progress = _lines(args)  # a bad file fails before the checkpoint is restored
    if plot and not sentences:
        raise CommandError("--plot-attention: no sentence to translate", status=2)
    translator = _translator(args, devices=_cpu_devices(args.cpu_devices))
    layers = translator.config.decoder_layers
    if plot and not -layers <= args.plot_layer < layers:
        message = f"--plot-layer {args.plot_layer}: the decoder has layers 0-{layers - 1}"
        raise CommandError(message, status=2)
    stream = translator.translate_stream(
        sentences,
        beam_size=args.beam,
        alpha=args.alpha,
        num_top=args.show_probs,
        attention=plot,  # one teacher-forced pass per decoded batch
    )
    for i, translation in enumerate(
        tqdm(stream, total=len(sentences), desc="translate", disable=not progress)
    ):
        print(translation.text, flush=True)
        if args.show_probs:
            print(probability_table(translation), end="\n\n")
        if plot and i == 0:
            from tfjax.plot import attention_heatmap

            path = attention_heatmap(
                translation.attention,
                args.plot_attention,
                layer=args.plot_layer,
                heads=args.plot_heads,
            )
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _typed(args: argparse.Namespace) -> bool:
    """No texts given and stdin is a terminal: the user types them one line at a time."""
    return not (args.sentences or args.file) and sys.stdin.isatty()


def _typed_lines(what: str) -> Iterator[str]:
    """Each non-blank line typed, as it ends, until end of input (Ctrl-D)."""
    print(f"type {what} and press Enter; Ctrl-D ends", file=sys.stderr, flush=True)
    return (line.rstrip("\n") for line in sys.stdin if line.strip())


def _translate_typed(args: argparse.Namespace) -> int:
    """Sentences typed at a terminal: each translated when its line ends, blank lines
    skipped, until end of input (Ctrl-D)."""
    translator = _translator(args)
    for line in _typed_lines("a sentence"):
        (translation,) = translator.translate(
            [line], beam_size=args.beam, alpha=args.alpha, num_top=args.show_probs
        )
        print(translation.text, flush=True)
        if args.show_probs:
            print(probability_table(translation), end="\n\n", flush=True)
    return 0


def _check_plot(path: str) -> None:
    """Refuse a --plot-attention path that cannot be written, before any model work."""
    from tfjax.plot import check_path

    try:
        check_path(path)
    except ValueError as e:
        raise CommandError(f"--plot-attention {e}", status=2) from e


_CHUNK = 512  # texts per pipeline call over a file or stdin, each call's results printed


def _pipeline(args: argparse.Namespace) -> int:
    typed = _typed(args)
    texts, progress = ([], False) if typed else _lines(args)
    if not (texts or typed):
        raise CommandError("no texts: give them as arguments, with --file, or on stdin")
    _check_texts(texts, args)  # a bad line fails before the checkpoint loads
    devices = _cpu_devices(args.cpu_devices)  # before anything starts JAX's backend
    from tfjax.pipelines import pipeline

    pipe = pipeline(
        args.task, args.workdir, batch_size=args.batch, step=args.step, best=args.best,
        devices=devices,
    )  # fmt: skip
    options: dict = {}
    if args.task == "fill-mask":
        options = dict(top_k=args.top_k or 5)
        if args.targets:
            options["targets"] = args.targets.split(",")
    elif args.task in ("text-classification", "sentiment-analysis"):
        options = dict(top_k=None if args.top_k == 0 else (args.top_k or 1))
    else:
        options = dict(num_beams=args.beam, return_step_probs=bool(args.show_probs))
        options.update(num_top=args.show_probs, min_length=args.min_length)
        options.update(no_repeat_ngram_size=args.no_repeat_ngram_size)
        if args.max_length:
            options["max_length"] = args.max_length
    if typed:  # at a terminal: each line's result when it ends, until Ctrl-D
        batches = ([line] for line in _typed_lines("a text"))
    else:  # in chunks, so results appear (and survive a Ctrl-C) as the work goes on
        batches = (texts[i : i + _CHUNK] for i in range(0, len(texts), _CHUNK))
    with tqdm(total=len(texts), desc=args.task, disable=not progress) as bar:
        for batch in batches:
            try:
                results = pipe(batch, **options)
            except ValueError as e:
                if not typed:
                    raise
                print(f"error: {e}", file=sys.stderr, flush=True)  # the next line may be fine
                continue
            for result in results:
                print(json.dumps(result, ensure_ascii=False), flush=True)
            bar.update(len(batch))
    return 0


def _check_texts(texts: Sequence[str], args: argparse.Namespace) -> None:
    """Refuse a blank text, or a fill-mask text without the mask, naming its line (or its
    place among the arguments)."""
    from tfjax.data import MASK_PIECE

    where = "text" if args.sentences else f"{args.file or '<stdin>'}: line"
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise CommandError(f"{where} {number} is empty")
        if args.task == "fill-mask" and MASK_PIECE not in text:
            raise CommandError(f"{where} {number} has no {MASK_PIECE}: {text!r}")


def _evaluate(args: argparse.Namespace) -> int:
    devices = _cpu_devices(args.cpu_devices)  # before anything starts JAX's backend
    from tfjax import recipe

    config, data = recipe.workdir_data(args.workdir, args.step, args.data_dir)
    source = data.source(args.split)
    if recipe.encoder_only(config):
        return _evaluate_encoder(args, config, source)
    summaries = recipe.task(config) == "summarization"
    # Summaries are as long as training allowed (the pipeline's default max_length too).
    longest = dict(max_decode_len=config.max_target_len) if summaries else {}
    result = _translator(args, devices=devices, **longest).evaluate(
        source,
        beam_size=args.beam,
        alpha=args.alpha,
        progress=True,
        min_length=args.min_length,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        rouge=summaries,
    )
    if summaries:
        from tfjax.evaluate import describe

        print(f"{args.split}: {len(source)} texts  {describe('summarization', result)}")
        return 0
    print(
        f"{args.split}: {len(source)} sentences  BLEU {result['bleu']:.2f}  "
        f"(lowercased {result['bleu_lowercase']:.2f})  chrF {result['chrf']:.2f}  "
        f"exact match {result['exact_match']:.2f}%  perplexity {result['perplexity']:.2f}\n"
        f"sacreBLEU signature: {result['signature']}"
    )
    return 0


def _evaluate_encoder(args: argparse.Namespace, config, source) -> int:
    """A classifier's accuracy and macro-F1, or a masked LM's masked-piece scores."""
    from tfjax import checkpoint, evaluate, recipe
    from tfjax.data import Tokenizer
    from tfjax.masking import Masking

    cfg, params, tokenizer_bytes, _ = checkpoint.restore_for_inference(
        args.workdir, args.step, best=args.best
    )
    tokenizer = Tokenizer(tokenizer_bytes)
    task = recipe.task(config)
    masking = None
    if task == "masked_lm":
        masking = Masking(tokenizer.mask_id, tokenizer.vocab_size, rate=config.mask_rate)
    result = evaluate.evaluate_encoder_split(
        recipe.build_model(task, cfg),
        params,
        tokenizer,
        source,
        recipe.eval_options(config),
        masking=masking,
    )
    print(f"{args.split}: {len(source)} texts  {evaluate.describe(task, result)}")
    return 0


def _distill_data(args: argparse.Namespace) -> int:
    from tfjax import distill, recipe

    train, data = recipe.workdir_data(args.workdir, args.step, args.data_dir)
    out = distill.write_distillation_data(
        _translator(args),
        data,
        (train.source_lang, train.target_lang),
        args.output,
        beam_size=args.beam,
        alpha=args.alpha,
    )
    print(f"wrote {out}: train with --config.dataset=folder --config.data_dir={out}")
    return 0


def _average(args: argparse.Namespace) -> int:
    from tfjax import checkpoint

    steps = checkpoint.average_checkpoints(args.workdir, args.output, args.last)
    print(f"averaged steps {steps} into {args.output}/checkpoints/{steps[-1]}")
    return 0


def _precompile(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """See tfjax.precompile. Exits 1 when a program does not fit a device's memory."""
    _check_numbers(args, lowest={"beam": 0})  # 0: the recipe's beam
    for flag in ("memory_gib", "peak_tflops"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CommandError(f"--{flag} {value}: must be above 0", status=2)
    config = load_config(args.config, overrides)
    from tfjax import recipe

    if recipe.encoder_only(config):
        # Its compile covers the encoder–decoder's train step and beam decoder only.
        task = recipe.task(config)
        raise CommandError(f"precompile takes translation recipes; task={task!r}", status=2)
    _simulated_devices(args.topology)
    from tfjax import precompile

    beam = args.beam or max(config.eval_beam_size, 2)
    try:
        target = precompile.get_target(args.topology, args.memory_gib, args.peak_tflops)
        mesh, reports = precompile.precompile(config, target, beam)
    except precompile.PrecompileError as e:
        raise CommandError(str(e), status=2) from e
    print(precompile.describe(target, mesh), flush=True)
    for report in reports:
        print("\n" + precompile.format_report(report, target), flush=True)
    if args.search_batch:
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
        _ask_host_devices(topology.removeprefix("cpu:"))  # checked by precompile.get_target


def _ask_host_devices(count: int | str) -> None:
    """Ask XLA for `count` CPU host devices: appended to XLA_FLAGS (the last one named wins),
    which JAX reads when it starts its CPU backend."""
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


def _serve(args: argparse.Namespace) -> int:
    """Load every workdir, then serve them until SIGTERM or Ctrl-C."""
    named = []
    for entry in args.model:
        name, sep, workdir = entry.partition("=")
        if not sep or not name or not workdir:
            raise CommandError(f"--model {entry!r}: expected NAME=DIR", status=2)
        named.append((name, workdir))
    named += [(os.path.basename(os.path.normpath(w)), w) for w in args.workdir]
    if not named:
        raise CommandError("nothing to serve: give --workdir DIR or --model NAME=DIR", status=2)
    names = [name for name, _ in named]
    if len(set(names)) != len(names):  # before minutes of loading
        raise CommandError(f"model names repeat: {names}; name them with --model NAME=DIR", 2)
    if args.max_wait_ms < 0 or args.timeout <= 0:
        raise CommandError("--max_wait_ms must be >= 0 and --timeout > 0", status=2)
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)
    from tfjax import serve

    # Bound first: a port in use is refused before minutes of loading and compiling.
    with serve.listen(args.host, args.port) as sock:
        served = []
        for name, workdir in named:
            print(f"loading {name} from {workdir}", file=sys.stderr, flush=True)
            served.append(serve.load(name, workdir, max_batch=args.max_batch))
        config = serve.ServerConfig(
            max_batch=args.max_batch,
            continuous=args.batching == "continuous",
            max_tokens=args.max_tokens,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            timeout=args.timeout,
        )
        if args.warmup:
            serve.warm_up(served, config.batches_continuously)
        serve.run(serve.Server(served, config), sock)
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a command may raise for bad input or a bad workdir, printed as one line."""
    from tfjax import checkpoint, recipe, trainer
    from tfjax.data import CorpusError

    return (
        CommandError,
        checkpoint.CheckpointError,
        recipe.ConfigError,
        trainer.TrainingError,
        CorpusError,
        ValueError,
        OSError,
    )


def _check_numbers(args: argparse.Namespace, lowest: dict[str, float] = _LOWEST) -> None:
    """Refuse a numeric argument outside its range (`lowest`, `_HIGHEST`) or not finite."""
    for name, value in vars(args).items():
        flag = "--show-probs" if name == "show_probs" else f"--{name}"  # as spelt
        if isinstance(value, float) and not math.isfinite(value):
            raise CommandError(f"{flag} {value}: must be a finite number", status=2)
        if name in lowest and value is not None and value < lowest[name]:
            raise CommandError(f"{flag} {value}: must be at least {lowest[name]}", status=2)
        if name in _HIGHEST and value is not None and value > _HIGHEST[name]:
            raise CommandError(f"{flag} {value}: must be at most {_HIGHEST[name]}", status=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "sentences", None) is not None and not any(x.startswith("-") for x in extra):
        # argparse stops filling a positional list at the first option: `pipeline TASK
        # --workdir DIR text...` leaves the texts over.
        args.sentences, extra = [*args.sentences, *extra], []
    if extra and not (args.command in _RECIPE_COMMANDS and extra[0].startswith("--config.")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_library_logs()
    commands = {
        "translate": _translate,
        "evaluate": _evaluate,
        "average": _average,
        "distill-data": _distill_data,
        "pipeline": _pipeline,
        "serve": _serve,
    }
    try:
        if args.command in _RECIPE_COMMANDS:
            run = {"train": _train, "precompile": _precompile}[args.command]
            return run(args, extra)
        _check_numbers(args)  # precompile's --beam 0 means "no decoder": its own checks
        return commands[args.command](args)
    except KeyboardInterrupt:
        if os.environ.get("TFJAX_TRACEBACK"):
            raise
        # What each command keeps (training's checkpoint, distill-data's translations) is
        # already on disk; what is left is to say so without a traceback.
        print(f"interrupted: {args.command} stopped (Ctrl-C)", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except Exception as e:
        if os.environ.get("TFJAX_TRACEBACK") or not isinstance(e, _expected_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "status", 1)
