"""The public API and the command line's entry points."""

import subprocess
import sys

import pytest

import tfjax
from tfjax import model, pipelines, trainer, translator


@pytest.mark.parametrize("name", tfjax.__all__)
def test_every_public_name_is_its_defining_modules_object(name):
    home = {"Translator": translator, "Translation": translator, "train_and_evaluate": trainer}
    home["pipeline"] = pipelines
    assert getattr(tfjax, name) is getattr(home.get(name, model), name)


def test_from_tfjax_import_the_documented_names():
    from tfjax import Transformer, TransformerConfig, Translator, preset, train_and_evaluate

    assert isinstance(Transformer(preset("tiny")).config, TransformerConfig)
    assert callable(train_and_evaluate) and hasattr(Translator, "from_workdir")
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tfjax.Nope  # noqa: B018


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["precompile", "--help"], ["translate", "--help"]]
    + [["pipeline", "--help"]],
)
def test_help_lists_the_commands_and_their_arguments(args):
    out = subprocess.run([sys.executable, "-m", "tfjax", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = "distill-data" if args == ["--help"] else "--workdir"
    expected = "--topology" if args[0] == "precompile" else expected
    assert expected in out.stdout


def test_pipeline_help_names_every_task():
    # The parser lists them by hand: building it must not import the pipelines (and JAX).
    out = subprocess.run(
        [sys.executable, "-m", "tfjax", "pipeline", "--help"], capture_output=True, text=True
    )
    listed = out.stdout.split("positional arguments:")[1].split("options:")[0]
    assert all(task in listed for task in pipelines.TASKS), listed


def test_unknown_arguments_are_refused_before_any_work():
    out = subprocess.run(
        [sys.executable, "-m", "tfjax", "translate", "--workdir=x", "--bogus"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
