"""Bad arguments, configs and files: each refused with one `error:` line, writing nothing."""

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, train_command

from tfjax import checkpoint, cli, recipe, trainer
from tfjax.cli import CommandError, load_config
from tfjax.translator import Translator

DEFAULT = str(ROOT / "configs" / "default.py")
sys.path.insert(0, str(ROOT))  # recipes import each other as configs.<name>, as train.py sees them


@pytest.fixture(scope="module")
def translator(uninterrupted):
    return Translator.from_workdir(uninterrupted, max_batch=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfjax", *args], capture_output=True, text=True)


def _assert_refused(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exactly one `error:` line on stderr holding every fragment."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _files(root: Path) -> dict[str, int]:
    """Every path under root -> its modification time, to show nothing was written."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_average_refuses_to_write_into_its_source(uninterrupted, tmp_path):
    workdir = Path(shutil.copytree(uninterrupted, tmp_path / "w"))
    alias = tmp_path / "alias"
    alias.symlink_to(workdir)
    before = _files(workdir)
    for output in (workdir, alias):
        out = _cli("average", "--workdir", str(workdir), "--last", "2", "--output", str(output))
        _assert_refused(out, "source")
    with pytest.raises(checkpoint.CheckpointError, match="inside the source"):
        checkpoint.average_checkpoints(workdir, workdir / "averaged", 2)
    assert _files(workdir) == before


def test_average_refuses_an_output_holding_the_step(uninterrupted, tmp_path):
    steps = checkpoint.average_checkpoints(uninterrupted, tmp_path / "avg", 2)
    assert (tmp_path / "avg" / "checkpoints" / str(steps[-1])).is_dir()
    before = _files(tmp_path / "avg")
    with pytest.raises(checkpoint.CheckpointError, match=f"already holds step {steps[-1]}"):
        checkpoint.average_checkpoints(uninterrupted, tmp_path / "avg", 2)
    assert _files(tmp_path / "avg") == before


def _saved_dtypes(workdir: Path, step: int):
    """Each parameter's dtype on disk: without jax_enable_x64, JAX restores float64 as float32."""
    with ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    ) as manager:
        tree = manager.item_metadata(step).state.tree["params"]
    return jax.tree_util.tree_map(lambda m: np.dtype(m.dtype), tree)


def test_average_keeps_each_saved_dtype(uninterrupted, tmp_path):
    steps = checkpoint.average_checkpoints(uninterrupted, tmp_path / "avg", 3)
    assert _saved_dtypes(tmp_path / "avg", steps[-1]) == _saved_dtypes(uninterrupted, steps[-1])
    originals = [checkpoint.restore_for_inference(uninterrupted, s)[1] for s in steps]
    _, averaged, _, meta = checkpoint.restore_for_inference(tmp_path / "avg", steps[-1])
    assert meta["averaged_steps"] == steps

    def check(mean, *saved):
        # The float64 mean, rounded once to the saved dtype.
        want = (sum(np.asarray(x, np.float64) for x in saved) / len(saved)).astype(saved[0].dtype)
        assert mean.dtype == saved[0].dtype
        np.testing.assert_array_equal(np.asarray(mean), want)

    jax.tree_util.tree_map(check, averaged, *originals)


@pytest.mark.parametrize("last", [0, -1, 4])
def test_average_last_out_of_range(uninterrupted, tmp_path, last):
    assert len(_checkpoint_steps(uninterrupted)) == 3  # the fixture keeps 3 checkpoints
    with pytest.raises(checkpoint.CheckpointError, match=f"asked to average {last} checkpoints"):
        checkpoint.average_checkpoints(uninterrupted, tmp_path / "avg", last)
    assert not (tmp_path / "avg").exists()


def test_cli_average_last_zero(uninterrupted, tmp_path):
    out = _cli(
        "average", "--workdir", str(uninterrupted), "--last", "0", "--output", str(tmp_path / "a")
    )
    _assert_refused(out, "--last 0")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("beam", [0, -3])
def test_translator_refuses_a_beam_below_one(translator, beam):
    with pytest.raises(ValueError, match=f"beam_size={beam}"):
        translator.translate(["ein mann"], beam_size=beam)
    with pytest.raises(ValueError, match=f"beam_size={beam}"):
        translator.translate_stream(["ein mann"], beam_size=beam)  # before the first item


def test_translator_refuses_a_batch_below_one(translator):
    with pytest.raises(ValueError, match="max_batch=0"):
        Translator(translator.config, translator.params, translator.tokenizer, max_batch=0)


def test_translator_refuses_a_length_penalty_that_is_not_a_number(translator):
    with pytest.raises(ValueError, match="alpha=nan"):
        translator.translate(["ein mann"], beam_size=2, alpha=float("nan"))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--beam", "0"), ("--beam", "-3"), ("--batch", "0"), ("--show-probs", "-1"),
        ("--alpha", "nan"), ("--alpha", "inf"),
    ],
)  # fmt: skip
def test_cli_translate_refuses_bad_numbers(uninterrupted, flag, value, capsys):
    # In-process: the numbers are checked before anything is loaded.
    assert cli.main(["translate", "--workdir", str(uninterrupted), flag, value, "ein"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} {value}: must be")


def test_cli_serve_refuses_a_port_out_of_range(uninterrupted, capsys):
    assert cli.main(["serve", "--workdir", str(uninterrupted), "--port", "65536"]) == 2
    assert capsys.readouterr().err == "error: --port 65536: must be at most 65535\n"


def test_a_folder_without_checkpoints_is_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="is .* a training workdir"):
        checkpoint.average_checkpoints(tmp_path, tmp_path.parent / "avg-out", 2)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in "):
        checkpoint.read_meta(tmp_path)
    # best/ is missing when no evaluation ran: not a question of the workdir being one.
    with pytest.raises(checkpoint.CheckpointError, match=r"best does not exist$"):
        checkpoint.restore_for_inference(tmp_path, best=True)


def test_num_top_is_clamped_to_the_vocabulary(translator, caplog):
    vocab = translator.config.target_vocab
    with caplog.at_level(logging.WARNING):
        (translation,) = translator.translate(["ein buch"], num_top=100_000)
    assert all(len(top) == vocab for top in translation.alternatives)
    assert any("num_top=100000" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="num_top=-1"):
        translator.translate(["ein buch"], num_top=-1)


def _config(*overrides: str):
    return load_config(DEFAULT, overrides)


def test_accum_steps_must_divide_the_batch(tmp_path):
    config = _config("--config.accum_steps=7")  # batch_size 64
    with pytest.raises(recipe.ConfigError, match="accum_steps=7"):
        recipe.validate(config)
    with pytest.raises(recipe.ConfigError, match="accum_steps=7"):
        trainer.setup(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_validate_lists_every_problem_at_once():
    bad = {
        "learning_rate": "-1.0",
        "warmup_steps": "-5",
        "num_train_steps": "0",
        "batch_size": "0",
        "accum_steps": "0",
        "max_source_len": "0",
        "max_target_len": "65",  # model.max_len is 64
        "model.dropout_rate": "1.0",
        "label_smoothing": "1.0",
        "vocab_size": "4",
        "log_every": "0",
        "eval_every": "0",
        "checkpoint_every": "0",
        "keep_checkpoints": "0",
        "eval_batch_size": "0",
        "eval_beam_size": "0",
        "eval_decode_sentences": "-1",
        "clip_norm": "-1.0",
        "weight_decay": "-0.1",
        "mesh": "(1,1)",
        "tokenizer_normalization": "zh_hant",
    }
    config = _config(*(f"--config.{k}={v}" for k, v in bad.items()))
    with pytest.raises(recipe.ConfigError) as error:
        recipe.validate(config)
    message = str(error.value)
    for key in bad:
        assert f"{key}=" in message, key


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--config.task=masked_lm", "--config.dataset=folder"], "not masked_lm"),
        (["--config.distill.teacher_workdir=/teacher"], "both choose the tokenizer"),
    ],
    ids=["masked_lm", "with_a_teacher"],
)
def test_init_from_is_refused_where_it_cannot_start_the_model(extra, fragment):
    with pytest.raises(recipe.ConfigError, match=fragment):
        recipe.validate(_config("--config.init_from=/masked-lm", *extra))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
    recipe.validate(load_config(str(path)))


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--config.no_such_key=1"], ["unknown field 'no_such_key'"]),
        (
            ["--config.learning_rate=-1", "--config.warmup_steps=-5"],
            ["learning_rate=-1", "warmup_steps=-5"],
        ),
    ],
    ids=["typo", "bad_values"],
)
def test_train_refuses_a_bad_config(corpus, tmp_path, extra, fragments):
    workdir = tmp_path / "w"
    out = subprocess.run(train_command(workdir, corpus, *extra), capture_output=True, text=True)
    _assert_refused(out, *fragments)
    assert not workdir.exists()


def test_train_names_a_tokenizer_file_that_is_not_a_model(corpus, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "spm.model").write_bytes(b"\x00garbage")
    out = subprocess.run(train_command(workdir, corpus), capture_output=True, text=True)
    # The data is prepared (and logged) before the tokenizer is read: the error is the last line.
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir / 'spm.model'}: not a sentencepiece model"), last
    assert not (workdir / "checkpoints").exists()


def test_translate_names_the_line_with_invalid_utf8(uninterrupted, tmp_path):
    source = tmp_path / "in.de"
    source.write_bytes(b"ok\n\xff\xfe bad\n")
    out = _cli("translate", "--workdir", str(uninterrupted), "--file", str(source))
    _assert_refused(out, str(source), "line 2")


def test_a_bad_config_with_a_teacher_writes_nothing(uninterrupted, tmp_path):
    """Distillation restores the teacher into the workdir first: the config is checked before."""
    config = _config(f"--config.distill.teacher_workdir={uninterrupted}", "--config.clip_norm=-1")
    with pytest.raises(recipe.ConfigError, match="clip_norm=-1"):
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        (None, "no such recipe file"),
        ("folder", "recipe.py: a folder, not a recipe file"),
        ("def get_config(:\n", "recipe.py:1: SyntaxError"),
        ("def get_config():\n    return 1 / 0\n", "recipe.py:2: ZeroDivisionError"),
    ],
    ids=["missing", "folder", "syntax", "raises"],
)
def test_a_recipe_that_cannot_load_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "recipe.py"
    if text == "folder":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    with pytest.raises(CommandError) as refused:
        load_config(str(path))
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_cli_serve_refuses_a_port_in_use_before_loading(tmp_path, capsys):
    # The workdir does not exist: the port is what is refused, so nothing was loaded first.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = ["serve", "--workdir", str(tmp_path / "missing"), "--port", str(port)]
        assert cli.main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--memory_gib", "nan", "nan: must be a finite number"),
        ("--memory_gib", "0", "0.0: must be above 0"),
        ("--peak_tflops", "-1", "-1.0: must be above 0"),
        ("--beam", "-2", "-2: must be at least 0"),
    ],
)  # fmt: skip
def test_cli_precompile_refuses_bad_numbers(flag, value, message, capsys):
    # In-process and before the recipe loads: a recipe that is not there is never reached.
    args = ["precompile", "--config", "missing.py", "--topology", "cpu:1", flag, value]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"error: {flag} {message}\n"


def test_translate_refuses_an_encoder_only_workdir(mlm_workdir, capsys):
    assert cli.main(["translate", "--workdir", str(mlm_workdir), "hello"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {mlm_workdir} holds an encoder-only masked_lm model; translating needs an "
        "encoder-decoder one (`python -m tfjax pipeline` serves this one)"
    )


def test_serve_refuses_repeated_names_before_loading(tmp_path, capsys):
    # The workdirs do not exist: the names are what is refused, before any load.
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert cli.main(["serve", "--workdir", str(a), "--workdir", str(b)]) == 2
    assert capsys.readouterr().err == (
        "error: model names repeat: ['run', 'run']; name them with --model NAME=DIR\n"
    )
