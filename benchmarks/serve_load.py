"""Load test of `python -m tfjax serve` on loopback: continuous and whole-call batching against
one request per decoder call, backpressure at a small queue, and memory over a long run.

  python benchmarks/serve_load.py --workdir=/tmp/m30k-de-en \
      [--sentences=MULTI30K/test_2016_flickr.de] [--seconds=20] [--soak_seconds=300]

Three servers run the same workdir side by side: continuous (--max_batch 32: greedy requests
join the running rows between decoder steps), calls (--batching=calls: requests grouped into
whole-batch decoder calls, 5 ms wait) and unbatched (--max_batch 1: one request per call).
For 1, 8, 32 and 128 concurrent clients, each sending single sentences of 1-40 words (cut
from --sentences, or from a built-in word list) back to back for --seconds, each server in
turn: requests/s, generated tokens/s, p50/p99 latency, errors
and wrong answers (a response that differs from the offline `Translator`'s greedy output for
its input). Then 128 clients against a continuous server with a 16-request queue (429s and how
fast they come back), and --soak_seconds of 32 clients against the continuous server with its
RSS after warm-up and at the end. Printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import provenance
from absl import app, flags

from tfjax import cli
from tfjax.translator import Translation, Translator

_WORKDIR = flags.DEFINE_string("workdir", None, "a translation workdir")
_SENTENCES = flags.DEFINE_string("sentences", None, "source lines to cut requests from")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "seconds per (server, clients) measurement")
_SOAK = flags.DEFINE_float("soak_seconds", 300.0, "seconds of the memory run; 0 skips it")
_POOL = flags.DEFINE_integer("pool", 400, "distinct request sentences")
_PROBE = flags.DEFINE_string("probe", None, "internal: run the 429 probe against this URL")
_CLIENTS = (1, 8, 32, 128)
WORDS = "ein mann fährt fahrrad eine frau liest ein buch zwei kinder spielen im park".split()
RESULTS = Path(__file__).with_name("RESULTS.md")


class ServerProcess:
    """`python -m tfjax serve` in a subprocess, its URL read from the line it prints."""

    def __init__(self, workdir: str, *flags_: str) -> None:
        command = [sys.executable, "-m", "tfjax", "serve", f"--model=m={workdir}", "--port=0",
                   "--warmup", *flags_]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if line.startswith("serving on "):
                self.url = line.split()[-1]
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-20:]))
        # Keep draining stderr, so that the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def request_pool(rng: np.random.Generator, translator: Translator) -> list[str]:
    """_POOL sentences of 1-40 words, consecutive words of the source text, each cut to the
    pieces the model reads (a longer one would be refused with 422)."""
    if _SENTENCES.value:
        words = Path(_SENTENCES.value).read_text("utf-8").split()
    else:
        words = list(rng.choice(WORDS, size=20_000))
    pool = []
    for _ in range(_POOL.value):
        n = int(rng.integers(1, 41))
        start = int(rng.integers(0, len(words) - n))
        while len(translator.tokenizer.encode(" ".join(words[start : start + n]))) > (
            translator.max_source_len
        ):
            n -= 1
        pool.append(" ".join(words[start : start + n]))
    return pool


# Relative gap under which two candidates are a tie: float32 sums whose order depends on the
# batch's shape (rows, padding) differ by about 1e-6 relative, and may swap them.
TIE = 1e-5


def at_a_tie(pieces: list[str], want: Translation) -> bool:
    """Whether an answer's pieces leave the offline translation's only where its two most
    probable pieces were tied (within TIE), for the second of them: the batch decided the
    rounding, not a bug."""
    n = min(len(pieces), len(want.pieces))
    i = next((i for i in range(n) if pieces[i] != want.pieces[i]), n)
    if i == n:  # one is a prefix of the other: no step chose differently
        return False
    (_, p1), (second, p2) = want.alternatives[i]
    return pieces[i] == second and p1 - p2 <= TIE * p1


async def load(url: str, clients: int, seconds: float, pool: list[str], expected: dict) -> dict:
    """`clients` concurrent clients sending pool sentences back to back for `seconds`."""
    latencies, statuses, tokens, wrong, ties, fast_429 = [], [], 0, 0, 0, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = time.perf_counter() + seconds

        async def one_client(k: int) -> None:
            nonlocal tokens, wrong, ties
            i = k
            while time.perf_counter() < stop:
                text = pool[i % len(pool)]
                i += clients
                tick = time.perf_counter()
                try:
                    response = await client.post("/v1/translate", json={"text": text})
                except httpx.HTTPError:
                    statuses.append("error")
                    continue
                took = time.perf_counter() - tick
                statuses.append(response.status_code)
                if response.status_code == 200:
                    latencies.append(took)
                    answer = response.json()["translations"][0]
                    tokens += len(answer["pieces"])
                    if answer["text"] != expected[text].text:
                        tie = at_a_tie(answer["pieces"], expected[text])
                        ties, wrong = ties + tie, wrong + (not tie)
                elif response.status_code == 429:
                    fast_429.append(took)
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

        health = []

        async def probe() -> None:
            # /health on its own connection every 100 ms: does it answer under this load?
            async with httpx.AsyncClient(base_url=url, timeout=120) as prober:
                while time.perf_counter() < stop:
                    tick = time.perf_counter()
                    await prober.get("/health")
                    health.append(time.perf_counter() - tick)
                    await asyncio.sleep(0.1)

        start = time.perf_counter()
        await asyncio.gather(probe(), *(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    ok = sum(s == 200 for s in statuses)
    return dict(
        rps=ok / elapsed,
        tokens=tokens / elapsed,
        p50=float(np.percentile(latencies, 50)) if latencies else float("nan"),
        p99=float(np.percentile(latencies, 99)) if latencies else float("nan"),
        errors=sum(s not in (200, 429) for s in statuses),
        rejected=sum(s == 429 for s in statuses),
        p99_429=float(np.percentile(fast_429, 99)) if fast_429 else float("nan"),
        wrong=wrong,
        ties=ties,
        requests=len(statuses),
        health_p99=float(np.percentile(health, 99)) if health else float("nan"),
    )


def probe_429(url: str, seconds: float) -> dict:
    """Sends one sentence every 100 ms for `seconds`; the 429s' count and p50 / p99 seconds."""
    took = []
    with httpx.Client(base_url=url, timeout=120) as client:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            tick = time.perf_counter()
            response = client.post("/v1/translate", json={"text": WORDS[0]})
            if response.status_code == 429:
                took.append(time.perf_counter() - tick)
            time.sleep(0.1)
    if not took:
        return dict(count=0, p50=float("nan"), p99=float("nan"))
    return dict(count=len(took), p50=np.percentile(took, 50), p99=np.percentile(took, 99))


def main(argv: list[str]) -> None:
    del argv
    if _PROBE.value:
        print(json.dumps(probe_429(_PROBE.value, _SECONDS.value)))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    cli.quiet_library_logs()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    translator = Translator.from_workdir(_WORKDIR.value, max_batch=32)
    pool = request_pool(np.random.default_rng(0), translator)
    expected = dict(zip(pool, translator.translate(pool, num_top=2), strict=True))
    continuous = ServerProcess(_WORKDIR.value, "--max_batch=32")
    calls = ServerProcess(_WORKDIR.value, "--max_batch=32", "--max_wait_ms=5", "--batching=calls")
    unbatched = ServerProcess(_WORKDIR.value, "--max_batch=1")
    servers = (("continuous", continuous), ("calls", calls), ("unbatched", unbatched))
    rows = []
    for clients in _CLIENTS:
        for name, server in servers:
            result = asyncio.run(load(server.url, clients, _SECONDS.value, pool, expected))
            rows.append((clients, name, result))
            print(clients, name, result, flush=True)
    unbatched_status, calls_status = unbatched.stop(), calls.stop()
    small = ServerProcess(_WORKDIR.value, "--max_batch=32", "--max_queue=16")
    # A client in a process of its own, one request every 100 ms: how fast the server
    # answers a 429, apart from the loaded clients' own event loop (which share the cores).
    probe = subprocess.Popen(
        [sys.executable, __file__, f"--probe={small.url}", f"--seconds={_SECONDS.value}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    overload = asyncio.run(load(small.url, 128, _SECONDS.value, pool, expected))
    overload["probe"] = json.loads(probe.communicate()[0])
    print("small queue", overload, flush=True)
    small_status = small.stop()
    soak = None
    if _SOAK.value > 0:
        asyncio.run(load(continuous.url, 32, 30.0, pool, expected))  # warm-up
        after_warmup = continuous.rss_mib()
        result = asyncio.run(load(continuous.url, 32, _SOAK.value, pool, expected))
        soak = (after_warmup, continuous.rss_mib(), result)
        print("soak", soak, flush=True)
    continuous_status = continuous.stop()
    statuses = (continuous_status, calls_status, unbatched_status, small_status)
    print_table(rows, overload, soak, statuses)


def print_table(rows, overload: dict, soak, statuses) -> None:
    machine = provenance.machine()
    by = {(c, n): r for c, n, r in rows}
    lines = [
        f"### serve_load: dynamic batching on loopback ({datetime.date.today()})",
        f"machine: {machine}; {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"versions: jax {jax.__version__}, python {platform.python_version()}; "
        f"{provenance.code_version()}; workdir {Path(_WORKDIR.value).name}; "
        f"{_SECONDS.value:g} s per row; exit statuses after SIGTERM {statuses}",
        "",
        "| clients | server | requests/s | generated tokens/s | p50 ms | p99 ms | /health p99 ms "
        "| errors | wrong | at a tie | reference: unbatched requests/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (clients, name), r in by.items():
        ref = by[clients, "unbatched"]["rps"]
        lines.append(
            f"| {clients} | {name} | {r['rps']:.1f} | {r['tokens']:.0f} | {1000 * r['p50']:.0f} "
            f"| {1000 * r['p99']:.0f} | {1000 * r['health_p99']:.1f} | {r['errors']} "
            f"| {r['wrong']} | {r['ties']} | {ref:.1f} "
            f"| {r['rps'] / ref:.2f} |"
        )
    o = overload
    served = o["requests"] - o["rejected"] - o["errors"]
    lines += [
        "",
        "| workload | requests | served | 429 | p99 ms of a 429 | separate client: 429s, "
        "p50 / p99 ms | errors | wrong | at a tie | requests/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 128 clients, continuous, queue 16 | {o['requests']} | {served} | {o['rejected']} "
        f"| {1000 * o['p99_429']:.1f} | {o['probe']['count']}, {1000 * o['probe']['p50']:.1f} "
        f"/ {1000 * o['probe']['p99']:.1f} | {o['errors']} | {o['wrong']} | {o['ties']} "
        f"| {o['rps']:.1f} |",
    ]
    if soak:
        before, after, r = soak
        lines += [
            "",
            "| workload | RSS after warm-up MiB | RSS at end MiB | end / warm-up | requests | "
            "errors | wrong | at a tie |",
            "|---|---|---|---|---|---|---|---|",
            f"| {_SOAK.value:g} s, 32 clients, continuous | {before:.0f} | {after:.0f} | "
            f"{after / before:.3f} | {r['requests']} | {r['errors']} | {r['wrong']} "
            f"| {r['ties']} |",
        ]
    print("\n".join(lines))
    with RESULTS.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
