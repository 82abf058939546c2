"""Compile count of a long-running Translator over 1,000 requests of mixed sizes and lengths.

  python benchmarks/compile_count.py --workdir DIR [--requests 1000] [--beam 1]

DIR is a training workdir (e.g. of configs/default.py). Requests draw a batch size of 1-32
sentences of 1-40 words at random; bucketing should keep the number of compiled decoder
programs at a handful however many requests arrive.
"""

import argparse
import platform
import time

import jax
import numpy as np

from tfjax import cli, generate
from tfjax.translator import Translator

WORDS = "one two three four five twenty thirty hundred and seven eight nine".split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--beam", type=int, default=1)
    args = parser.parse_args()
    cli.quiet_library_logs()

    translator = Translator.from_workdir(args.workdir, max_batch=32, max_decode_len=64)
    decoder = generate.translate_greedy if args.beam == 1 else generate.translate_beam
    rng = np.random.default_rng(0)
    start_programs = decoder._cache_size()
    checkpoints = {1, 10, 100, args.requests // 2, args.requests}
    rows, shapes = [], set()
    tick = time.perf_counter()
    for i in range(1, args.requests + 1):
        batch = [
            " ".join(rng.choice(WORDS, size=rng.integers(1, 41)))
            for _ in range(rng.integers(1, 33))
        ]
        translator.translate(batch, beam_size=args.beam)
        # What an unbucketed decoder would compile for: (batch size, longest source).
        shapes.add((len(batch), max(len(x) for x in translator.tokenizer.encode_batch(batch))))
        if i in checkpoints:
            programs = decoder._cache_size() - start_programs
            rows.append((i, programs, len(shapes), time.perf_counter() - tick))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {jax.devices()[0]}")
    print(f"versions: jax {jax.__version__}")
    print("workload: Translator.translate, greedy" if args.beam == 1 else f"beam {args.beam}")
    header = f"{'requests':>9} {'compiled':>9} {'reference: unbucketed shapes':>29} {'ratio':>6}"
    print(header + f" {'seconds':>8}")
    for i, programs, unbucketed, seconds in rows:
        print(
            f"{i:>9} {programs:>9} {unbucketed:>29} {programs / unbucketed:>6.3f} {seconds:>8.1f}"
        )


if __name__ == "__main__":
    main()
