"""Decoding speed of tfjax beside torch Marian `generate` and CTranslate2, on the same weights.

  python benchmarks/decode_speed.py [--rounds=3] [--repeats=7] [--threads=2] [--budget_mib=1024]
      [--max_isa=AVX2]

The W-small model (shared vocabulary 8,000, d_model 256, 3 + 3 layers, 4 heads, d_ff 1024,
fp32) is a randomly initialised transformers `MarianMTModel` (fixed seed), converted to tfjax
with `tfjax.interop.from_marian` and to CTranslate2 with its own Transformers converter, so the
three engines run one set of weights; tfjax also runs it in bfloat16 (parameters and compute,
float32 accumulation), its outputs compared with fp32's. Workloads (random source ids, fixed
seed, 24 source tokens ending in eos): batch 32 beam 4, batch 32 greedy, one sentence greedy
and one sentence beam 4, each exactly 32 generated tokens (eos is banned before the 32nd step
in every engine). tfjax decodes as `Translator` does, with the output table also laid out
[D, V] (`tfjax.model.with_logits_table`).
Greedy outputs are compared token for token across engines, beam outputs by their best
hypothesis. Each engine runs in its own process (on 2 cores one engine's spinning thread pool
slows the next), torch and CTranslate2 with 1 and with --threads threads, tfjax with XLA's
own thread pool and with a batch's rows split over --threads XLA host devices, one block each
(`generate.over_devices`, what `Translator(devices=...)` does). The runs are repeated
in --rounds interleaved rounds (every run once, then every run again), so that a slow spell of
a shared machine lands on all engines rather than on one. A ratio is computed per round, to the
reference's faster run in that round; the tables give its median over rounds and each round's.

With --max_isa=AVX2 every engine is held to AVX2 kernels on a CPU that has AVX-512 (XLA's
--xla_cpu_max_isa, CTranslate2's CT2_FORCE_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, oneDNN's
ONEDNN_MAX_CPU_ISA, torch's ATEN_CPU_CAPABILITY, set for the timed processes): the kernels
an AVX2-only machine runs, on this machine's caches and memory, which an AVX2-only machine
of another kind does not share. The header says so.

Printed and appended to benchmarks/RESULTS.md, under a header naming the CPU's vector ISA:
- generated tokens/s (batch x 32 / seconds) and one sentence's ms per token: each round's
  figure is the median of --repeats timed calls after a warm-up; printed are the median over
  rounds, the min-max over every timed call, and the ratios to each reference;
- the compile time of tfjax's jitted beam and greedy decoders;
- early stop: eos forced from step k, the model calls tfjax's scan decoder makes (counted by a
  host callback in the logits processor) and its time, for k = 4, 8, 16, 32;
- the self-attention key/value cache: bytes per row and step by formula and as allocated,
  the encoder-decoder cache per sentence, and the largest batch x beam whose cache fits in
  --budget_mib for 24 source and 32 target tokens.
Outputs are compared, and the last three are measured, in round 1 only.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from provenance import code_version, machine

from tfjax import decode, generate
from tfjax.interop.marian import MarianImport, load_marian
from tfjax.model import Transformer, with_logits_table

_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds of every run", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed calls per workload, engine and round")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for torch and CTranslate2 (and 1)")
_BUDGET = flags.DEFINE_integer("budget_mib", 1024, "memory budget for the cache-size question")
_WORKER = flags.DEFINE_string("worker", "", "internal: time this engine in this process")
_SCRATCH = flags.DEFINE_string("scratch", "", "internal: the converted models' directory")
_EXTRAS = flags.DEFINE_boolean("extras", False, "internal: also measure tfjax's extra tables")
_MAX_ISA = flags.DEFINE_enum("max_isa", "", ["", "AVX2"], "hold every engine to AVX2 kernels")

VOCAB, D_MODEL, LAYERS, HEADS, D_FF = 8000, 256, 3, 4, 1024
EOS, UNK, PAD = 0, 1, VOCAB - 1  # Marian's layout: eos 0, unk 1, pad (= decoder start) last
SOURCE_LEN, STEPS, BATCH, BEAM = 24, 32, 32, 4
RESULTS = Path(__file__).with_name("RESULTS.md")
# What holds each engine's kernels to AVX2 (--max_isa=AVX2), set for the timed processes.
AVX2_ONLY = {
    "CT2_FORCE_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}
WORKLOADS = {  # name -> (batch, beam)
    "beam4_b32": (BATCH, BEAM),
    "greedy_b32": (BATCH, 1),
    "greedy_b1": (1, 1),
    "beam4_b1": (1, BEAM),
}


def marian_model() -> Any:
    """The randomly initialised W-small MarianMTModel (torch, eval mode)."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=VOCAB,
        decoder_vocab_size=VOCAB,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=D_FF,
        decoder_ffn_dim=D_FF,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=None,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(config).eval()


def source_ids(batch: int) -> np.ndarray:
    """[batch, SOURCE_LEN] random ids (never pad or eos) ending in eos."""
    rng = np.random.default_rng(batch)
    ids = rng.integers(2, PAD, size=(batch, SOURCE_LEN), dtype=np.int32)
    ids[:, -1] = EOS
    return ids


class _Vocabulary:
    """What CTranslate2's Marian loader reads from a tokenizer: the vocabulary and two tokens."""

    eos_token, unk_token = "</s>", "<unk>"

    def get_vocab(self) -> dict[str, int]:
        names = {EOS: self.eos_token, UNK: self.unk_token, PAD: "<pad>"}
        return {names.get(i, f"t{i}"): i for i in range(VOCAB)}


def ct2_convert(directory: Path, quantization: str | None) -> None:
    """<directory>/hf converted by CTranslate2's TransformersConverter into <directory>/ct2[_int8].

    Its Marian loader reads only a vocabulary and two tokens from the tokenizer, so a
    `_Vocabulary` stands in for tokenizer files.
    """
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _Vocabulary()

    out = directory / ("ct2_int8" if quantization else "ct2")
    Converter(str(directory / "hf")).convert(str(out), quantization=quantization, force=True)


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of `repeats` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tick)
    return times, out


def ban_eos_before(step: int) -> decode.LogitsProcessor:
    """Bans pad (the decoder start) always and eos at steps < `step`; forces eos from `step`."""

    def processor(logits: jax.Array, t: jax.Array) -> jax.Array:
        logits = logits.at[:, PAD].set(-jnp.inf)
        eos_only = jnp.full_like(logits, -jnp.inf).at[:, EOS].set(0.0)
        return jnp.where(t < step, logits.at[:, EOS].set(-jnp.inf), eos_only)

    return processor


def counting(processor: decode.LogitsProcessor, calls: list[int]) -> decode.LogitsProcessor:
    """`processor`, plus a host callback that appends to `calls` once per model call."""

    def counted(logits: jax.Array, t: jax.Array) -> jax.Array:
        jax.debug.callback(lambda: calls.append(1))
        return processor(logits, t)

    return counted


def marian_spec(processor: decode.LogitsProcessor) -> decode.DecodeSpec:
    """Marian's special ids (the decoder starts from pad) with `processor`."""
    return decode.DecodeSpec(bos_id=PAD, eos_id=EOS, pad_id=PAD, logits_processor=processor)


class TfjaxEngine:
    """tfjax's jitted decoders over the converted parameters (bf16: parameters and compute
    in bfloat16, products accumulated in float32; split: a batch's rows decoded in blocks,
    one per device, `generate.over_devices`)."""

    def __init__(self, converted: MarianImport, bf16: bool = False, split: bool = False) -> None:
        config, params = converted.config, converted.params
        if bf16:
            config = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
            params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
        self.model = Transformer(config)
        # As `Translator` decodes: the output table also laid out [D, V] for small batches.
        params = with_logits_table(params)
        self.params = jax.device_put(params)
        self.replicas = generate.Replicas.of(params, jax.devices()) if split else None
        self.processor = ban_eos_before(STEPS)  # one object: one compiled program per shape

    def decode(
        self, inputs: np.ndarray, beam: int, processor: Any = None, max_len: int = STEPS
    ) -> Any:
        return self.decode_with(self.params, inputs, beam, processor, max_len)

    def decode_with(
        self, params: Any, inputs: Any, beam: int, processor: Any = None, max_len: int = STEPS
    ) -> Any:
        spec = marian_spec(processor or self.processor)
        if beam == 1:
            return generate.translate_greedy(
                self.model, params, inputs, spec, max_decode_len=max_len
            )
        return generate.translate_beam(
            self.model, params, inputs, spec, max_decode_len=max_len, beam_size=beam, alpha=0.0
        )

    def compile_seconds(self, inputs: np.ndarray, beam: int) -> float:
        """Time to trace and compile the decoder for this shape (nothing cached)."""
        fn = generate.translate_greedy if beam == 1 else generate.translate_beam
        spec = marian_spec(ban_eos_before(STEPS))  # a new processor object: a fresh compile
        kwargs = dict(max_decode_len=STEPS)
        if beam > 1:
            kwargs.update(beam_size=beam, alpha=0.0)
        tick = time.perf_counter()
        fn.lower(self.model, self.params, inputs, spec, **kwargs).compile()
        return time.perf_counter() - tick

    def run(self, inputs: np.ndarray, beam: int) -> np.ndarray:
        """Best hypothesis ids [B, STEPS]."""
        if self.replicas is None:
            tokens = np.asarray(jax.block_until_ready(self.decode(inputs, beam)).tokens)
        else:

            def decoder(params: Any, block: jax.Array) -> jax.Array:
                return self.decode_with(params, block, beam).tokens

            tokens = generate.over_devices(decoder, self.replicas, inputs)
        return tokens if beam == 1 else tokens[:, 0]


def torch_run(hf_model: Any, inputs: np.ndarray, beam: int) -> np.ndarray:
    """transformers' generate, exactly STEPS new tokens; best hypothesis ids [B, STEPS]."""
    import torch

    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=torch.from_numpy(inputs.astype(np.int64)),
            attention_mask=torch.ones(inputs.shape, dtype=torch.long),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            bad_words_ids=[[PAD]],
            length_penalty=0.0,
            early_stopping=False,
        )
    return out[:, 1:].numpy()  # drop the decoder start


def ct2_run(translator: Any, inputs: np.ndarray, beam: int) -> np.ndarray:
    vocab = _Vocabulary().get_vocab()
    names = {i: t for t, i in vocab.items()}
    tokens = [[names[int(i)] for i in row] for row in inputs]
    results = translator.translate_batch(
        tokens,
        beam_size=beam,
        max_decoding_length=STEPS,
        min_decoding_length=STEPS,
        length_penalty=0.0,
        max_batch_size=len(tokens),
    )
    return np.array([[vocab[t] for t in r.hypotheses[0]] for r in results])


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """Rows whose ids are identical, and token positions that are."""
    return f"rows {np.mean(np.all(a == b, axis=1)):.0%}, tokens {np.mean(a == b):.1%}"


def cache_bytes(engine: TfjaxEngine, sentences: int, beam: int) -> tuple[int, int]:
    """(self-attention, encoder-decoder) bytes of the cache the beam decoder starts from."""
    cache = generate.init_cache(engine.model, engine.params, source_ids(sentences), beam, STEPS)
    total = {"self": 0, "cross": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        name = jax.tree_util.keystr(path)
        if "cached_" in name:  # keys and values; not the step index or the source mask
            total["cross" if "cross_attention" in name else "self"] += leaf.nbytes
    return total["self"], total["cross"]


def tfjax_extras(engine: TfjaxEngine) -> list[str]:
    """Compile times, early stop and cache-size tables (markdown lines)."""
    compile_rows = [
        f"| {w} | {engine.compile_seconds(source_ids(b), k):.1f} |"
        for w, (b, k) in WORKLOADS.items()
    ]
    lines = ["| tfjax decoder | compile s |", "|---|---|", *compile_rows, ""]
    lines += [
        "Early stop (tfjax, batch 32, eos forced from step k; max 32 steps):",
        "",
        "| k | beam | model calls | median ms | vs k=32 |",
        "|---|---|---|---|---|",
    ]
    inputs = source_ids(BATCH)
    for beam in (1, BEAM):
        full = None
        for k in (32, 16, 8, 4):
            calls: list[int] = []
            jax.block_until_ready(engine.decode(inputs, beam, counting(ban_eos_before(k), calls)))
            jax.effects_barrier()
            processor = ban_eos_before(k)
            times, _ = time_calls(
                lambda p=processor, b=beam: jax.block_until_ready(engine.decode(inputs, b, p)),
                _REPEATS.value,
            )
            median = statistics.median(times)
            full = full or median
            lines.append(
                f"| {k} | {beam} | {len(calls)} | {median * 1e3:.1f} | {median / full:.2f} |"
            )
    per_row_step = 2 * LAYERS * D_MODEL * 4  # K and V, every decoder layer, fp32
    per_sentence_cross = 2 * LAYERS * SOURCE_LEN * D_MODEL * 4
    measured_self, measured_cross = cache_bytes(engine, BATCH, BEAM)
    budget = _BUDGET.value * 2**20
    # rows = batch x beam: rows * STEPS * per_row_step + (rows / BEAM) * per_sentence_cross.
    largest = int(budget // (STEPS * per_row_step + per_sentence_cross / BEAM))
    lines += [
        "",
        "Key/value cache (fp32):",
        "",
        "| quantity | formula | measured (allocated by tfjax) |",
        "|---|---|---|",
        f"| self-attention bytes per row per step | 2 x {LAYERS} layers x {D_MODEL} x 4 = "
        f"{per_row_step} | {measured_self / (BATCH * BEAM * STEPS):.0f} |",
        f"| encoder-decoder bytes per sentence ({SOURCE_LEN} source tokens) | 2 x {LAYERS} x "
        f"{SOURCE_LEN} x {D_MODEL} x 4 = {per_sentence_cross} | {measured_cross / BATCH:.0f} |",
        f"| largest batch x beam (beam {BEAM}) in {_BUDGET.value} MiB of cache | {largest} | |",
    ]
    return lines


def worker(engine: str, threads: int, scratch: Path, with_extras: bool) -> None:
    """Times one engine on every workload in this fresh process; writes <scratch>/<run>.npz."""
    hf_dir = scratch / "hf"
    extras: list[str] = []
    if engine.startswith("tfjax"):
        tfjax = TfjaxEngine(load_marian(hf_dir), bf16=engine == "tfjax_bf16", split=threads > 0)
        run = tfjax.run
    elif engine == "torch":
        import torch
        from transformers import MarianMTModel

        torch.set_num_threads(threads)
        hf = MarianMTModel.from_pretrained(hf_dir).eval()
        run = functools.partial(torch_run, hf)
    else:
        import ctranslate2

        translator = ctranslate2.Translator(
            str(scratch / engine), device="cpu", inter_threads=1, intra_threads=threads
        )
        run = functools.partial(ct2_run, translator)
    result: dict[str, Any] = {}
    for workload, (batch, beam) in WORKLOADS.items():
        inputs = source_ids(batch)
        times, out = time_calls(lambda i=inputs, b=beam: run(i, b), _REPEATS.value)
        result[f"{workload}/times"], result[f"{workload}/ids"] = np.array(times), out
    if engine == "tfjax" and not threads and with_extras:
        extras = tfjax_extras(tfjax)
    np.savez(scratch / f"{engine}-{threads}.npz", extras=np.array(extras), **result)


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        worker(_WORKER.value, _THREADS.value, Path(_SCRATCH.value), _EXTRAS.value)
        return
    scratch = tempfile.TemporaryDirectory()
    directory = Path(scratch.name)
    hf = marian_model()
    hf.save_pretrained(directory / "hf")
    for quantization in (None, "int8"):
        ct2_convert(directory, quantization)
    # ("tfjax", n): a batch's rows split over n XLA host devices, one block each.
    runs = [("tfjax", 0), ("tfjax", _THREADS.value), ("tfjax_bf16", 0)] + [
        (engine, threads)
        for engine in ("torch", "ct2", "ct2_int8")
        for threads in sorted({1, _THREADS.value})
    ]
    env = dict(os.environ)
    if _MAX_ISA.value:
        env.update(AVX2_ONLY)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX2".strip()
    rounds = []
    for index in range(_ROUNDS.value):
        results = {}
        for engine, threads in runs:
            # A fresh process per engine: no thread pool spinning from one engine slows another.
            print(
                f"round {index + 1}/{_ROUNDS.value}: timing {engine} "
                f"({threads or 'default'} threads)",
                flush=True,
            )
            command = [sys.executable, __file__, f"--worker={engine}", f"--threads={threads}"]
            command += [f"--scratch={directory}", f"--repeats={_REPEATS.value}"]
            # The extra tables do not depend on the round: measure them once.
            command += [f"--extras={index == 0}"]
            run_env = env
            if engine == "tfjax" and threads:  # the rows split over `threads` host devices
                devices = f"--xla_force_host_platform_device_count={threads}"
                run_env = dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {devices}".strip())
            subprocess.run(command, check=True, env=run_env)
            results[engine, threads] = dict(np.load(directory / f"{engine}-{threads}.npz"))
        rounds.append(results)
    lines = report(rounds)
    print("\n".join(lines))
    with RESULTS.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    scratch.cleanup()


def _speed(times: np.ndarray, workload: str) -> np.ndarray:
    """tokens/s per timed call, or ms per token for the one-sentence workloads."""
    batch, _ = WORKLOADS[workload]
    return times / STEPS * 1e3 if batch == 1 else batch * STEPS / times


def _threads(engine: str, threads: int) -> str:
    """The threads column: XLA's own pool, rows split over host devices, or a thread count."""
    if engine.startswith("tfjax"):
        return f"rows over {threads} host devices" if threads else "XLA default"
    return f"{threads} threads"


def _ratio(per_round: list[float]) -> str:
    """'1.08x (1.05 / 1.08 / 1.12)': the median over rounds, then each round's ratio."""
    return f"{statistics.median(per_round):.2f}x ({' / '.join(f'{x:.2f}' for x in per_round)})"


def report(rounds: list[dict[tuple[str, int], dict[str, np.ndarray]]]) -> list[str]:
    """The markdown tables: speeds, per-round ratios to each reference's faster run, agreement."""
    import ctranslate2
    import torch
    import transformers

    where = machine() + (", held to AVX2 kernels (--max_isa=AVX2)" if _MAX_ISA.value else "")
    versions = f"jax {jax.__version__}, torch {torch.__version__}, transformers "
    versions += f"{transformers.__version__}, ctranslate2 {ctranslate2.__version__}"
    lines = [
        f"### decode_speed, {datetime.date.today()}, {where}, {versions}, {code_version()}",
        "",
        f"W-small fp32 (tfjax_bf16: bfloat16), source {SOURCE_LEN} tokens, {STEPS} generated "
        f"tokens per sentence; each engine timed in its own process, in {len(rounds)} "
        "interleaved rounds.",
        "",
        "| workload | engine | threads | figure | median | min-max | vs torch | vs ct2 fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    agreements = []
    first = rounds[0]
    for workload in WORKLOADS:
        # Per round: each run's median seconds, and each reference's faster run's.
        medians = [
            {k: float(np.median(r[f"{workload}/times"])) for k, r in results.items()}
            for results in rounds
        ]
        best = [
            {
                ref: min(m for (e, _), m in round_medians.items() if e == ref)
                for ref in ("torch", "ct2")
                if any(e == ref for e, _ in round_medians)
            }
            for round_medians in medians
        ]
        for (engine, threads), r in first.items():
            speeds = [
                _speed(results[engine, threads][f"{workload}/times"], workload)
                for results in rounds
            ]
            figure = statistics.median(float(np.median(s)) for s in speeds)
            every = np.concatenate(speeds)
            ratios = [
                _ratio([b[ref] / m[engine, threads] for b, m in zip(best, medians, strict=True)])
                if ref in best[0]
                else ""
                for ref in ("torch", "ct2")
            ]
            lines.append(
                f"| {workload} | {engine} | {_threads(engine, threads)} "
                f"| {'ms/token' if WORKLOADS[workload][0] == 1 else 'tokens/s'} "
                f"| {figure:.1f} | {every.min():.1f}-{every.max():.1f} "
                f"| {ratios[0]} | {ratios[1]} |"
            )
            if (engine, threads) != ("tfjax", 0):
                ours = first["tfjax", 0][f"{workload}/ids"]
                agreements.append(
                    f"| {workload} | tfjax vs {engine} ({_threads(engine, threads)}) "
                    f"| {agreement(ours, r[f'{workload}/ids'])} |"
                )
    lines += [
        "",
        "Figures: the median over rounds of each round's median; min-max over every timed call. "
        "Ratios, per round: the faster run of that reference's time / this run's time "
        "(> 1: faster); the median over rounds, then each round's. Outputs and the tables "
        "below: round 1.",
        "",
        "| workload | outputs | identical |",
        "|---|---|---|",
        *agreements,
        "",
        *[str(x) for x in first["tfjax", 0]["extras"]],
    ]
    return lines


if __name__ == "__main__":
    app.run(main)
