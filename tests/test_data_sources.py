"""Dataset names: the synthetic task, prepared TFDS folders, and the errors for the rest."""

import functools

import pytest

from tfjax import data
from tfjax.data import sources, synthetic


@pytest.mark.parametrize(
    "name, source_lang, target_lang",
    [
        ("wmt14_translate/de-en", "en", "de"),
        ("wmt17_translate/de-en", "de", "en"),
        ("ted_hrlr_translate/pt_to_en", "pt", "en"),
        ("wmt19_translate/zh-en", "en", "zh"),
    ],
)
def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path, name, source_lang, target_lang):
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.prepare(name, source_lang=source_lang, target_lang=target_lang, data_dir=str(tmp_path))
    message = str(info.value)
    assert f"{name!r} is not prepared at {tmp_path}" in message
    assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message
    assert "folder of line-aligned text files" in message


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="not a TFDS dataset registered"):
        data.prepare("no_such_corpus", source_lang="de", target_lang="en", data_dir=str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare(
            str(tmp_path / "nowhere"), source_lang="de", target_lang="en", data_dir=str(tmp_path)
        )
    (tmp_path / "train.de").write_text("ein Satz\n")  # a corpus file given for its folder
    with pytest.raises(FileNotFoundError, match=r"train\.de is a file, not a folder$"):
        data.prepare(
            str(tmp_path / "train.de"), source_lang="de", target_lang="en", data_dir=str(tmp_path)
        )


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return data.build_synthetic(
        "zh", str(tmp_path_factory.mktemp("tfds")), train_size=60, eval_size=5
    )


def test_prepared_builder_dir_either_direction(synthetic_dir):
    forward = data.prepare(synthetic_dir, source_lang="en", target_lang="zh")
    backward = data.prepare(synthetic_dir, source_lang="zh", target_lang="en")
    assert forward.split_sizes == {"train": 60, "validation": 5, "test": 5}
    example = forward.source("test")[0]
    assert backward.source("test")[0] == {"source": example["target"], "target": example["source"]}
    assert len(forward.source("train")) == 60


def test_languages_must_be_in_the_dataset(synthetic_dir):
    with pytest.raises(ValueError, match=r"has languages \['en', 'zh'\], not \['de'\]"):
        data.prepare(synthetic_dir, source_lang="en", target_lang="de")


def test_unknown_split(synthetic_dir):
    built = data.prepare(synthetic_dir, source_lang="en", target_lang="zh")
    with pytest.raises(ValueError, match="split 'dev' not in"):
        built.source("dev")


def test_synthetic_by_name(tmp_path, monkeypatch):
    # The default sizes (40k training pairs) take seconds to build; the name's handling does not
    # depend on them.
    small = functools.partial(synthetic.build_synthetic, train_size=50, eval_size=5)
    monkeypatch.setattr(sources, "build_synthetic", small)
    built = data.prepare(data.SYNTHETIC, source_lang="zh", target_lang="en", data_dir=str(tmp_path))
    assert built.split_sizes == {"train": 50, "validation": 5, "test": 5}
    source, target = synthetic.generate_splits("zh", seed=0, train_size=50, eval_size=5)["test"][0]
    assert built.source("test")[0] == {"source": target, "target": source}
    with pytest.raises(ValueError, match="pairs en with one of"):
        data.prepare(data.SYNTHETIC, source_lang="de", target_lang="zh", data_dir=str(tmp_path))
