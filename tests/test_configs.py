"""Every recipe in configs/ loads, builds a model config, and has no key nothing reads."""

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tfjax import recipe
from tfjax.model import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")
sys.path.insert(0, str(ROOT))  # recipes import each other as configs.<name>, as train.py sees them
# The recipe module turns a config into objects; the trainer reads the loop's own keys.
READERS = "".join((ROOT / "tfjax" / f).read_text() for f in ("recipe.py", "trainer.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_every_key_is_read(path):
    config = _load(path)
    assert isinstance(recipe.model_config(config), TransformerConfig)
    read = set(re.findall(r"config\.(\w+)", READERS))
    unread = [k for k in config.keys() if k not in read]
    assert not unread, f"{path.name}: keys nothing reads: {unread}"
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} | {"preset"}
    unknown = [k for k in config.model.keys() if k not in fields]
    assert not unknown, f"{path.name}: model keys that are not TransformerConfig fields: {unknown}"


def test_docstring_gives_the_command():
    for path in CONFIGS:
        assert "python train.py --config=configs/" in path.read_text(), path.name
