"""Local folders of line-aligned text files, checked and built into a TFDS array_record dataset.

A folder holds one file per split and language, named `<split>.<lang>` or `<split>.<lang>.gz`
(e.g. `train.de` + `train.en`, `val.de` + `val.en`, `test_2016_flickr.de.gz` + ...): line i of
one language is the translation of line i of the other. Files of other languages (e.g. an
`.attribution` column) are ignored. The split names come from the file names.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

_FILE_NAME = re.compile(r"^(?P<split>\w+)\.(?P<lang>[A-Za-z][\w-]*?)(?P<gz>\.gz)?$")
_UTF8_BOM = b"\xef\xbb\xbf"


class CorpusError(ValueError):
    """A text file that cannot be read as one side of a parallel corpus; names file and line."""

    def __init__(self, path: epath.PathLike, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path = str(path)
        self.line = line


def find_splits(folder: epath.PathLike, languages: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """Maps each split name to its pair of files, ordered as `languages`.

    Raises FileNotFoundError when the folder has no split with both languages, and
    CorpusError when a split has one language's file but not the other's.
    """
    files: dict[tuple[str, str], str] = {}
    for path in sorted(epath.Path(folder).iterdir()):
        match = _FILE_NAME.match(path.name)
        if match and match["lang"] in languages:
            key = (match["split"], match["lang"])
            if key in files:
                raise ValueError(f"{files[key]} and {path} are both {key[0]}.{key[1]}")
            files[key] = str(path)
    splits = {}
    for split in sorted({split for split, _ in files}):
        paths = [files.get((split, lang)) for lang in languages]
        if None in paths:
            present = next(p for p in paths if p is not None)
            missing = languages[paths.index(None)]
            raise CorpusError(present, 1, f"no partner file {split}.{missing}[.gz] in {folder}")
        splits[split] = (paths[0], paths[1])
    if not splits:
        raise FileNotFoundError(
            f"{folder} has no <split>.{languages[0]} / <split>.{languages[1]} pair of text files"
        )
    return splits


def _read_lines(path: str) -> Iterator[str]:
    """Yields the lines of a UTF-8 text file (gzipped if it ends in .gz) without line ends."""
    with epath.Path(path).open("rb") as raw_file:
        f = gzip.GzipFile(fileobj=raw_file) if path.endswith(".gz") else raw_file
        number = 0
        for number, line in enumerate(f, start=1):
            # Only "\n" ends a line: str.splitlines() would also split at U+2028 and friends,
            # which occur inside sentences of real corpora and would break the alignment.
            line = line.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM) :]
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"invalid UTF-8 at byte {e.start} of the line"
                raise CorpusError(path, number, problem) from e
        if number == 0:
            raise CorpusError(path, 1, "file is empty; expected one sentence per line")


def read_parallel(paths: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """Yields aligned (line of paths[0], line of paths[1]) pairs, checking as it reads.

    Raises CorpusError naming the file and line for an empty file, invalid UTF-8, or a file
    that ends before the other one.
    """
    missing = object()
    first, second = paths
    pairs = itertools.zip_longest(_read_lines(first), _read_lines(second), fillvalue=missing)
    for number, (a, b) in enumerate(pairs, start=1):
        if a is missing or b is missing:
            short, other = (first, second) if a is missing else (second, first)
            raise CorpusError(
                short, number, f"file ends at line {number - 1} but {other} has more lines"
            )
        yield a, b


def fingerprint(paths: list[str]) -> str:
    """A short hash of file names, sizes and modification times: a new one means rebuild."""
    h = hashlib.sha256()
    for path in sorted(paths):
        stat = epath.Path(path).stat()
        h.update(f"{epath.Path(path).name}\0{stat.length}\0{stat.mtime}\0".encode())
    return h.hexdigest()[:12]


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The DatasetInfo of a dataset built here, which has no published metadata to fetch.

    TFDS reads an unprepared builder's metadata from its GCS bucket into a fresh
    `tempfile.mkdtemp` folder, which it never removes, even when GCS is disabled: one empty
    folder left in the temp directory for every build.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: the metadata comes from the build itself."""


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """Which folder and language pair a ParallelTextFolder builds (TFDS needs defaults)."""

    folder: str = ""
    languages: tuple[str, str] = ("", "")


class ParallelTextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a folder of line-aligned text files into TFDS splits of Translation examples.

    Examples keep their line order (record i is line i + 1), so an evaluation can match
    outputs with references by index.
    """

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find. TFDS 4.9.10's own lookup of the code path needs the
    # `importlib_resources` backport on Python >= 3.9 and fails without it.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description=f"Line-aligned text files from {self.builder_config.folder}.",
            features=tfds.features.Translation(languages=self.builder_config.languages),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the files are local.
        cfg = self.builder_config
        return {
            split: self._generate_examples(paths)
            for split, paths in find_splits(cfg.folder, cfg.languages).items()
        }

    def _generate_examples(self, paths: tuple[str, str]) -> Iterator[tuple[int, dict]]:
        first, second = self.builder_config.languages
        for index, (a, b) in enumerate(read_parallel(paths)):
            yield index, {first: a, second: b}


def build_folder(folder: epath.PathLike, languages: tuple[str, str], data_dir: str | None) -> str:
    """Builds `folder` into `data_dir` unless an up-to-date build is there; returns its path.

    The build lives in `<data_dir>/parallel_text_folder/<folder name>-<langs>-<fingerprint>/`;
    changing, adding or touching a file changes the fingerprint and so triggers a new build.
    """
    folder = epath.Path(folder).expanduser().resolve()
    languages = tuple(sorted(languages))  # One build serves both translation directions.
    splits = find_splits(folder, languages)
    slug = re.sub(r"\W+", "_", folder.name).strip("_") or "corpus"
    stamp = fingerprint([p for pair in splits.values() for p in pair])
    config = FolderConfig(
        name=f"{slug}-{languages[0]}-{languages[1]}-{stamp}",
        folder=str(folder),
        languages=languages,
    )
    builder = ParallelTextFolder(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
