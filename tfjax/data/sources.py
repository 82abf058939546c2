"""Dataset names to prepared TFDS splits, read with `tfds` array_record data sources.

A dataset is named by one string:
  - "synthetic": the built-in number-words task (synthetic.py), English to "de" or "zh";
  - a folder of line-aligned text files (folder.py), built into `data_dir` on first use;
  - a folder of JSONL files (jsonl_folder.py), read from field `source_lang` to `target_lang`;
  - a folder that already holds a prepared TFDS dataset (it has a dataset_info.json);
  - a registered TFDS translation dataset, e.g. "wmt14_translate/de-en",
    "ted_hrlr_translate/pt_to_en", "wmt19_translate/zh-en", prepared as array_record.
The translation direction is always `source_lang` -> `target_lang`, whatever the name says.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
from collections.abc import Sequence

import tensorflow_datasets as tfds

# The wmt*_translate builders live in this legacy package, which tfds imports lazily.
import tensorflow_datasets.translate  # noqa: F401
from etils import epath

from tfjax.data.folder import build_folder
from tfjax.data.jsonl_folder import build_jsonl_folder, is_jsonl_folder
from tfjax.data.synthetic import LANGUAGES as SYNTHETIC_LANGUAGES
from tfjax.data.synthetic import build_synthetic

SYNTHETIC = "synthetic"


class DatasetNotPreparedError(FileNotFoundError):
    """A registered TFDS dataset that is not prepared in data_dir and was not downloaded."""


class ParallelSource:
    """One split read in one direction: `source[i]` is {"source": str, "target": str}.

    A grain random-access data source (`len` and integer indexing) with batched reads.
    """

    def __init__(self, records: Sequence[dict[str, bytes]], source_lang: str, target_lang: str):
        """records: a TFDS data source of one split (`builder.as_data_source(split)`)."""
        self._records = records
        self._langs = (source_lang, target_lang)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self._example(self._records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        """Reads many examples at once: about ten times faster per example than indexing."""
        return [self._example(record) for record in self._records.__getitems__(list(indices))]

    def examples(self) -> list[dict[str, str]]:
        """Every example of the split, in order, read in one batched call."""
        return self.__getitems__(range(len(self)))

    def _example(self, record: dict[str, bytes]) -> dict[str, str]:
        source, target = self._langs
        return {"source": record[source].decode(), "target": record[target].decode()}

    def __repr__(self) -> str:
        return f"ParallelSource({self._records!r}, {self._langs[0]}->{self._langs[1]})"


@dataclasses.dataclass(frozen=True)
class TranslationData:
    """A prepared TFDS translation dataset and the direction to read it in."""

    builder_dir: str  # e.g. <data_dir>/parallel_text_folder/multi30k-de-en-<hash>/1.0.0
    source_lang: str
    target_lang: str

    @property
    def split_sizes(self) -> dict[str, int]:
        """Examples per split, e.g. {"train": 29000, "val": 1014, ...}."""
        splits = self.builder.info.splits
        return {name: splits[name].num_examples for name in splits}

    def source(self, split: str) -> ParallelSource:
        """The examples of `split` as a random-access ParallelSource."""
        splits = self.builder.info.splits
        if split not in splits:
            raise ValueError(f"split {split!r} not in {self.builder_dir}; it has {list(splits)}")
        records = self.builder.as_data_source(split=split)
        return ParallelSource(records, self.source_lang, self.target_lang)

    @functools.cached_property
    def builder(self) -> tfds.core.DatasetBuilder:
        """The TFDS builder read back from builder_dir (no dataset code needed)."""
        return tfds.builder_from_directory(self.builder_dir)


def prepare(
    dataset: str,
    *,
    source_lang: str,
    target_lang: str,
    data_dir: str | None = None,
    download: bool = False,
) -> TranslationData:
    """Finds or builds `dataset` (see the module docstring) and returns it, direction fixed.

    data_dir is where folders and the synthetic task are built and where registered TFDS
    datasets are looked up (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    download=True lets TFDS download and prepare a registered dataset that is missing, which
    needs the network and, for most translation datasets, TensorFlow.
    """
    path = epath.Path(dataset).expanduser()
    if dataset == SYNTHETIC:
        builder_dir = build_synthetic(_synthetic_language(source_lang, target_lang), data_dir)
    elif path.is_dir() and (path / "dataset_info.json").exists():
        builder_dir = str(path)
    elif path.is_dir() and is_jsonl_folder(path):
        # source_lang and target_lang name the two JSON fields, e.g. "dialogue", "summary".
        builder_dir = build_jsonl_folder(path, (source_lang, target_lang), data_dir)
    elif path.is_dir():
        builder_dir = build_folder(path, (source_lang, target_lang), data_dir)
    elif dataset.startswith(("/", ".", "~")):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"dataset folder {dataset} {what}")
    else:
        builder_dir = _registered_dir(dataset, data_dir, download)
    data = TranslationData(builder_dir, source_lang, target_lang)
    _check_languages(data)
    return data


def _synthetic_language(source_lang: str, target_lang: str) -> str:
    """The non-English side of the synthetic task, which may be read in either direction."""
    pair = {source_lang, target_lang}
    others = pair - {"en"}
    if "en" not in pair or len(others) != 1 or not others <= set(SYNTHETIC_LANGUAGES):
        raise ValueError(
            f"the synthetic task pairs en with one of {SYNTHETIC_LANGUAGES}; "
            f"got {source_lang}->{target_lang}"
        )
    return others.pop()


def _registered_dir(name: str, data_dir: str | None, download: bool) -> str:
    """The prepared directory of a registered TFDS dataset, downloading it if allowed."""
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"dataset {name!r} is not 'synthetic', not a folder, and not a TFDS dataset "
            f"registered with this tensorflow-datasets"
        ) from e
    if builder.is_prepared():
        return str(builder.data_dir)
    if not download:
        raise DatasetNotPreparedError(_how_to_prepare(name, builder, "download=False"))
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # Any failure (network, missing TensorFlow) gets the same advice.
        reason = f"download failed with {type(e).__name__}"
        raise DatasetNotPreparedError(_how_to_prepare(name, builder, reason)) from e
    return str(builder.data_dir)


def _how_to_prepare(name: str, builder: tfds.core.DatasetBuilder, reason: str) -> str:
    root = builder.data_dir_root
    return textwrap.dedent(f"""\
        TFDS dataset {name!r} is not prepared at {builder.data_dir} ({reason}).
        Either prepare it as array_record on a machine with network access and TensorFlow:
            pip install tensorflow tensorflow-datasets
            tfds build {name} --data_dir={root} --file_format=array_record
        and copy {root}/{builder.name} here (or pass its parent as data_dir); or put the
        corpus in a folder of line-aligned text files (e.g. train.de + train.en,
        val.de + val.en; plain or .gz) and pass that folder as the dataset.""")


def _check_languages(data: TranslationData) -> None:
    """Both languages must be features of the dataset."""
    features = data.builder.info.features
    missing = {data.source_lang, data.target_lang} - set(features.keys())
    if missing:
        raise ValueError(
            f"{data.builder_dir} has languages {sorted(features.keys())}, not {sorted(missing)}"
        )
