"""Local folders of single-text task data (classification, masked-LM text), built with TFDS.

Two formats, one file per split named `<split>.<suffix>` or `<split>.<suffix>.gz`; both need
a `train` split and are built into array_record like the translation folders of folder.py:
  - labelled TSV (`train.tsv`, `dev.tsv`, ...): a header line of tab-separated column names
    that include `label` and `sentence` (others are ignored), then one example per line;
  - plain text (`train.txt`, `valid.txt`, ...): one example per line, blank lines skipped.
Records keep file order, and read back as {"source": str} or {"source": str, "label": int}.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from tfjax.data.folder import CorpusError, LocalDatasetInfo, _read_lines, fingerprint

KINDS = {"tsv": "tsv", "text": "txt"}  # prepare_task kind -> file suffix
_HEADER_HINT = "expected label<TAB>sentence"


def find_task_splits(folder: epath.PathLike, suffix: str) -> dict[str, str]:
    """Maps each split name to its file `<split>.<suffix>` or `<split>.<suffix>.gz`.

    Raises FileNotFoundError when there is none, ValueError when a split has both forms.
    """
    pattern = re.compile(rf"^(?P<split>\w+)\.{re.escape(suffix)}(\.gz)?$")
    splits: dict[str, str] = {}
    for path in sorted(epath.Path(folder).iterdir()):
        match = pattern.match(path.name)
        if not match:
            continue
        split = match["split"]
        if split in splits:
            raise ValueError(f"{splits[split]} and {path} are both the {split!r} split")
        splits[split] = str(path)
    if not splits:
        raise FileNotFoundError(f"{folder} has no <split>.{suffix} or <split>.{suffix}.gz files")
    return splits


def _numbered_labelled(path: str) -> Iterator[tuple[int, str, str]]:
    """Yields (line number, label, sentence); read_labelled without dropping the number."""
    lines = enumerate(_read_lines(path), start=1)
    _, header = next(lines)  # _read_lines raises for an empty file, so there is a line 1.
    columns = [name.strip() for name in header.split("\t")]
    for name in ("label", "sentence"):
        if name not in columns:
            raise CorpusError(path, 1, f"header has no {name!r} column; {_HEADER_HINT}")
    label_at, sentence_at = columns.index("label"), columns.index("sentence")
    number = 1
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) < len(columns):
            problem = f"{len(fields)} tab-separated columns but the header has {len(columns)}"
            raise CorpusError(path, number, problem)
        label, sentence = fields[label_at].strip(), fields[sentence_at].strip()
        if not label:
            raise CorpusError(path, number, "empty label")
        if not sentence:
            raise CorpusError(path, number, "empty sentence")
        yield number, label, sentence
    if number == 1:
        raise CorpusError(path, 2, f"file has a header but no examples; {_HEADER_HINT}")


def read_labelled(path: str) -> Iterator[tuple[str, str]]:
    """Yields (label, sentence) per data line of a labelled TSV file, checking as it reads.

    Raises CorpusError naming the file and its line (header = line 1) for an empty file, a
    header without `label` or `sentence`, a short line, an empty label or sentence, invalid
    UTF-8, or no examples. Surrounding whitespace is stripped; extra columns are ignored.
    """
    for _, label, sentence in _numbered_labelled(path):
        yield label, sentence


def label_names(path: str) -> tuple[str, ...]:
    """The sorted distinct labels of a file; all-integer labels sort numerically ("2" < "10")."""
    labels = {label for label, _ in read_labelled(path)}
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        # The string breaks ties such as "1" and "01", which are distinct class names.
        return tuple(sorted(labels, key=lambda label: (int(label), label)))
    return tuple(sorted(labels))


def read_text(path: str) -> Iterator[str]:
    """Yields the non-blank lines of a text file, stripped; CorpusError if there are none.

    An empty file fails in _read_lines ("file is empty"); one of blank lines fails here.
    """
    seen = False
    for line in _read_lines(path):
        if line.strip():
            seen = True
            yield line.strip()
    if not seen:
        raise CorpusError(path, 1, "file has no text; expected one example per line")


@dataclasses.dataclass
class LabelledConfig(tfds.core.BuilderConfig):
    """Which folder a LabelledTextFolder builds and its train labels (TFDS needs defaults)."""

    folder: str = ""
    labels: tuple[str, ...] = ()


@dataclasses.dataclass
class TextConfig(tfds.core.BuilderConfig):
    """Which folder a PlainTextFolder builds (TFDS needs a default)."""

    folder: str = ""


class LabelledTextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a folder of labelled TSV files into TFDS splits of {sentence, label} examples."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # No checksums file to find; see ParallelTextFolder in folder.py.

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(self.builder_config.labels)),
        }
        return LocalDatasetInfo(
            builder=self,
            description=f"Labelled TSV files from {self.builder_config.folder}.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # Record i is example i, so outputs match by index.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the files are local.
        splits = find_task_splits(self.builder_config.folder, "tsv")
        return {split: self._generate_examples(path) for split, path in splits.items()}

    def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
        labels = self.builder_config.labels
        index_of = {label: index for index, label in enumerate(labels)}
        for index, (number, label, sentence) in enumerate(_numbered_labelled(path)):
            if label not in index_of:
                problem = f"label {label!r} is not a label of the training split ({list(labels)})"
                raise CorpusError(path, number, problem)
            yield index, {"sentence": sentence, "label": index_of[label]}


class PlainTextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a folder of one-example-per-line text files into TFDS splits of {text}."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # No checksums file to find; see ParallelTextFolder in folder.py.

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description=f"Plain text files from {self.builder_config.folder}.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager
        splits = find_task_splits(self.builder_config.folder, "txt")
        return {split: self._generate_examples(path) for split, path in splits.items()}

    def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
        for index, text in enumerate(read_text(path)):
            yield index, {"text": text}


def _train_splits(folder: epath.PathLike, suffix: str) -> tuple[epath.Path, dict[str, str], str]:
    """The resolved folder, its splits (which must include train), and its build name."""
    folder = epath.Path(folder).expanduser().resolve()
    splits = find_task_splits(folder, suffix)
    if "train" not in splits:
        raise FileNotFoundError(
            f"{folder} has no train.{suffix}[.gz]; it has splits {sorted(splits)}"
        )
    slug = re.sub(r"\W+", "_", folder.name).strip("_") or "corpus"
    return folder, splits, f"{slug}-{fingerprint(list(splits.values()))}"


def build_labelled_folder(folder: epath.PathLike, data_dir: str | None) -> str:
    """Builds a labelled TSV folder into data_dir unless an up-to-date build is there.

    The build lives in `<data_dir>/labelled_text_folder/<folder name>-<fingerprint>/`, so a
    changed, added or touched file triggers a new build. Returns the builder directory.
    """
    folder, splits, name = _train_splits(folder, "tsv")
    # The class names are fixed by the training split; other splits are checked against them.
    config = LabelledConfig(name=name, folder=str(folder), labels=label_names(splits["train"]))
    builder = LabelledTextFolder(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def build_text_folder(folder: epath.PathLike, data_dir: str | None) -> str:
    """Builds a plain text folder into `<data_dir>/plain_text_folder/<name>-<fingerprint>/`."""
    folder, _, name = _train_splits(folder, "txt")
    config = TextConfig(name=name, folder=str(folder))
    builder = PlainTextFolder(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


class TaskSource:
    """One split: `source[i]` is {"source": str}, plus "label": int for labelled data.

    A grain random-access data source (`len` and integer indexing) with batched reads.
    """

    def __init__(self, records: Sequence[dict], text_key: str, labelled: bool):
        """records: a TFDS data source of one split (`builder.as_data_source(split)`)."""
        self._records = records
        self._text_key = text_key
        self._labelled = labelled

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._example(self._records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Reads many examples at once, much faster per example than indexing."""
        return [self._example(record) for record in self._records.__getitems__(list(indices))]

    def examples(self) -> list[dict]:
        """Every example of the split, in order, read in one batched call."""
        return self.__getitems__(range(len(self)))

    def _example(self, record: dict) -> dict:
        # Text features come back as bytes, ClassLabel as a numpy int64.
        example: dict = {"source": record[self._text_key].decode()}
        if self._labelled:
            example["label"] = int(record["label"])
        return example

    def __repr__(self) -> str:
        return f"TaskSource({self._records!r})"


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A prepared TFDS dataset of a labelled TSV or plain text folder."""

    builder_dir: str  # e.g. <data_dir>/labelled_text_folder/sst2-<hash>/1.0.0

    @functools.cached_property
    def builder(self) -> tfds.core.DatasetBuilder:
        """The TFDS builder read back from builder_dir (no dataset code needed)."""
        return tfds.builder_from_directory(self.builder_dir)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Examples per split, e.g. {"train": 67349, "dev": 872}."""
        splits = self.builder.info.splits
        return {name: splits[name].num_examples for name in splits}

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names, label i being label_names[i]; () for plain text."""
        features = self.builder.info.features
        return tuple(features["label"].names) if "label" in features else ()

    def source(self, split: str) -> TaskSource:
        """The examples of `split` as a random-access TaskSource."""
        splits = self.builder.info.splits
        if split not in splits:
            raise ValueError(f"split {split!r} not in {self.builder_dir}; it has {list(splits)}")
        labelled = "label" in self.builder.info.features
        records = self.builder.as_data_source(split=split)
        return TaskSource(records, "sentence" if labelled else "text", labelled)


def prepare_task(folder: epath.PathLike, kind: str, data_dir: str | None = None) -> TaskData:
    """Builds (or reuses) a task folder of `kind` "tsv" or "text" and returns it.

    A folder holding a dataset_info.json is taken to be a prepared TFDS dataset, used as is.
    """
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {sorted(KINDS)}, not {kind!r}")
    path = epath.Path(folder).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"task folder {folder} {what}")
    if (path / "dataset_info.json").exists():
        return TaskData(str(path))
    build = build_labelled_folder if kind == "tsv" else build_text_folder
    return TaskData(build(path, data_dir))
