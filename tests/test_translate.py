"""Translator and `python -m tfjax` on a checkpoint of the shared tiny training run."""

import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import STEPS, corrupt_latest, ending_in_eos, env_with_xla_flag

from tfjax import checkpoint, cli, generate
from tfjax.translator import Translator


@pytest.fixture(scope="module")
def translator(uninterrupted):
    return Translator.from_workdir(uninterrupted, max_batch=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfjax", *args], capture_output=True, text=True)


def test_translation_carries_its_own_probabilities(translator):
    sentence = ["ein mann liest ein buch"]
    greedy = translator.translate(sentence, num_top=3)[0]
    beam = translator.translate(sentence, beam_size=3, num_top=3)[0]
    for t in (greedy, beam):
        # A 16-step model may not reach eos: then the output stops at max_decode_len.
        assert len(t.log_probs) == len(t.pieces) and len(t.pieces) >= 1
        assert t.score == pytest.approx(sum(t.log_probs))
        for top in t.alternatives:
            probs = [p for _, p in top]
            assert probs == sorted(probs, reverse=True) and len(top) == 3
    # Greedy picks the most probable piece at every step, and reports its probability.
    for piece, log_p, top in zip(greedy.pieces, greedy.log_probs, greedy.alternatives, strict=True):
        assert top[0][0] == piece and top[0][1] == pytest.approx(np.exp(log_p), rel=1e-5)
    assert beam.penalised is not None and greedy.penalised is None


def test_score_equals_the_decoders_own_log_probs(translator):
    # A translation that ends in eos: one cut at max_decode_len is re-tokenized to fit its eos.
    (sentence,) = ending_in_eos(translator, count=1)
    greedy = translator.translate([sentence])[0]
    scored = translator.score([sentence], [greedy.text])[0]
    assert [p for p, _ in scored] == greedy.pieces
    np.testing.assert_allclose([lp for _, lp in scored], greedy.log_probs, atol=1e-5)


def test_bucketing_keeps_the_compile_count_flat(translator):
    rng = np.random.default_rng(0)
    words = "ein mann fährt fahrrad eine frau liest buch zwei kinder".split()
    translator.translate(["ein mann"])  # batch bucket 1 compiled
    before = generate.translate_greedy._cache_size()
    for n in (1, 2, 3, 4, 5, 7, 9):  # batch sizes fall in buckets 1, 2, 4 (max_batch 4)
        batch = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(n)]
        translator.translate(batch)
    # One length bucket (sources <= 16 tokens) times two new batch buckets.
    assert generate.translate_greedy._cache_size() - before <= 2


def test_bad_input_is_refused(translator, caplog):
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        translator.translate(["ein mann", "  "])
    with pytest.raises(TypeError, match="list of sentences"):
        translator.translate("ein mann")
    long = " ".join(["mann"] * 200)  # longer than max_len: truncated with a warning
    assert translator.translate([long])[0].text
    assert "sentence 0 ('mann mann mann mann mann mann…') has" in caplog.text
    # Characters the corpus never had are spelled as bytes, not <unk>, and still translate.
    unseen = translator.tokenizer.encode("ein 猫 mann ☃")
    assert 1 not in unseen.tolist()  # unk id
    assert translator.translate(["ein 猫 mann ☃"])[0].pieces


def test_cli_translate_shows_probabilities(uninterrupted):
    out = _cli("translate", "--workdir", str(uninterrupted), "--show-probs", "2", "ein buch")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].split()[:3] == ["step", "chosen", "p"]
    assert lines[2].split()[0] == "0" and len(lines[2].split()) >= 7  # piece, p, 2 x (alt, p)


def test_cli_translate_reads_a_file_with_beam(uninterrupted, tmp_path):
    source = tmp_path / "in.de"
    source.write_text("ein mann\neine frau liest\n")
    out = _cli("translate", "--workdir", str(uninterrupted), "--beam", "3", "--file", str(source))
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.splitlines()) == 2


def test_cli_evaluate_prints_bleu_with_signature(uninterrupted):
    out = _cli("evaluate", "--workdir", str(uninterrupted), "--split", "test")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BLEU" in out.stdout and "chrF" in out.stdout and "nrefs:1|case:mixed" in out.stdout
    # Rows split over two host devices: the same translations, so the same scores.
    split = _cli(
        "evaluate", "--workdir", str(uninterrupted), "--split", "test", "--cpu_devices", "2"
    )
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == out.stdout


def test_typed_sentences_are_translated_as_each_line_ends(uninterrupted):
    """At a terminal, each line is answered before the next is typed; blank lines are skipped
    and Ctrl-D ends with status 0."""
    terminal, typed = os.openpty()
    command = [sys.executable, "-m", "tfjax", "translate", "--workdir", str(uninterrupted)]
    process = subprocess.Popen(
        command, stdin=typed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.close(typed)
    watchdog = threading.Timer(120, process.kill)  # a translator waiting for EOF would hang
    watchdog.start()
    try:
        os.write(terminal, b"zwei kinder spielen\n")
        first = process.stdout.readline()
        os.write(terminal, b"\n ein mann liest\n")
        second = process.stdout.readline()
        os.write(terminal, b"\x04")  # Ctrl-D at the start of a line: end of input
        assert process.wait() == 0, process.stderr.read()[-2000:]
    finally:
        watchdog.cancel()
        os.close(terminal)
    expected = Translator.from_workdir(uninterrupted).translate(
        ["zwei kinder spielen", " ein mann liest"]
    )
    assert [first, second] == [t.text + "\n" for t in expected]


def test_ctrl_c_is_one_line_not_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_translate", interrupted)
    assert cli.main(["translate", "--workdir", "anywhere", "x"]) == 130
    assert capsys.readouterr().err == "interrupted: translate stopped (Ctrl-C)\n"


def test_cli_errors_are_one_line(tmp_path):
    out = _cli("translate", "--workdir", str(tmp_path), "hallo")
    assert out.returncode == 1 and out.stderr.strip().startswith("error:")
    assert "training workdir" in out.stderr


def test_a_corrupt_checkpoint_is_one_line_without_tracebacks(uninterrupted, tmp_path):
    """translate stops on a corrupt checkpoint with one line naming it, and no traceback."""
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    latest = corrupt_latest(workdir)[-1]
    out = _cli("translate", "--workdir", str(workdir), "ein mann")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    error = f"error: checkpoint {workdir}/checkpoints/{latest} is unreadable: "
    assert out.stderr.splitlines()[-1].startswith(error)


def test_named_and_latest_checkpoints(uninterrupted):
    assert checkpoint.read_meta(uninterrupted)["train"]["num_train_steps"] == STEPS
    # A run that finished saved its last step.
    assert checkpoint.latest_step(uninterrupted) == STEPS
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint step 3"):
        Translator.from_workdir(uninterrupted, step=3)


def test_checkpoint_averaging(uninterrupted, tmp_path):
    out = _cli("average", "--workdir", str(uninterrupted), "--last", "2", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    steps = sorted(checkpoint.Checkpointer(uninterrupted, async_saves=False).latest.all_steps())
    a, b = (checkpoint.restore_for_inference(uninterrupted, s)[1] for s in steps[-2:])
    config, averaged, tokenizer, meta = checkpoint.restore_for_inference(tmp_path)
    assert meta["averaged_steps"] == steps[-2:]
    for x, y, mean in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, averaged)), strict=True):
        np.testing.assert_allclose(mean, (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-6, atol=1e-7)
    assert Translator.from_workdir(tmp_path).translate(["ein mann"])[0].pieces
    with pytest.raises(checkpoint.CheckpointError, match="asked to average 9"):
        checkpoint.average_checkpoints(uninterrupted, tmp_path / "x", 9)


_SPLIT_SCRIPT = """
import json, sys
import jax
from tfjax.translator import Translator
workdir, sentences = sys.argv[1], json.loads(sys.argv[2])
t = Translator.from_workdir(workdir, max_batch=4, devices=jax.devices())
assert len(t._decode_params.copies) == 2  # a `generate.Replicas`: the rows are split
out = {beam: [[x.text, x.log_probs] for x in t.translate(sentences, beam_size=beam)]
       for beam in (1, 3)}
print(json.dumps(out))
"""


def test_rows_split_over_devices_translate_as_on_one(translator, uninterrupted):
    """`Translator(devices=...)` decodes a batch's rows in blocks, one per device, and joins
    them: the same translations and probabilities as one device decoding the batch whole."""
    import json

    # Batches of 4 and of 3 rows (bucketed to 4): blocks of 2 rows over the 2 devices.
    sentences = ["ein mann", "zwei kinder lesen", "eine frau fährt fahrrad", "ein buch"] * 2
    sentences = sentences[:7]
    run = subprocess.run(
        [sys.executable, "-c", _SPLIT_SCRIPT, str(uninterrupted), json.dumps(sentences)],
        env=env_with_xla_flag("--xla_force_host_platform_device_count=2"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    split = json.loads(run.stdout.splitlines()[-1])
    for beam in (1, 3):
        expected = translator.translate(sentences, beam_size=beam)  # max_batch 4, one device
        got = split[str(beam)]
        assert [text for text, _ in got] == [x.text for x in expected]
        for (_, log_probs), x in zip(got, expected, strict=True):
            np.testing.assert_allclose(log_probs, x.log_probs, atol=1e-5)


def test_cli_cpu_devices_split_rows_and_refuse_zero(uninterrupted):
    sentences = ["ein mann", "zwei kinder lesen", "eine frau fährt fahrrad"]
    out = _cli("translate", "--workdir", str(uninterrupted), "--cpu_devices", "2", *sentences)
    assert out.returncode == 0, out.stderr[-3000:]
    translator = Translator.from_workdir(uninterrupted)  # one device: the reference
    expected = translator.translate(sentences)
    assert out.stdout.splitlines() == [x.text for x in expected]
    # The translation pipeline splits its rows the same way, beam search included.
    pipe = _cli(
        "pipeline", "translation", "--workdir", str(uninterrupted), "--cpu_devices", "2",
        "--beam", "3", *sentences,
    )  # fmt: skip
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    expected = translator.translate(sentences, beam_size=3)
    got = [json.loads(line)["translation_text"] for line in pipe.stdout.splitlines()]
    assert got == [x.text for x in expected]
    bad = _cli("translate", "--workdir", str(uninterrupted), "--cpu_devices", "0", "ein mann")
    assert bad.returncode == 2 and "--cpu_devices 0: must be at least 1" in bad.stderr
