"""Local folders of JSON Lines files (e.g. summarization), checked and built with TFDS.

A folder holds one file per split, named `<split>.jsonl` or `<split>.jsonl.gz` (e.g. SAMSum's
`train.jsonl`, `validation.jsonl`, `test.jsonl`), with one JSON object per line such as
{"id": "13818513", "dialogue": "Amanda: I baked cookies.\r\nJerry: Sure!", "summary": "..."}.
Two string fields are chosen by name and built, like the translation folders of folder.py,
into array_record with one Text feature per field; other fields are ignored. Reading one
field as "source" and the other as "target" makes the folder a TranslationData, so nothing
downstream needs to know it is not a translation. Values are kept verbatim (the newlines
between dialogue turns included); blank lines are skipped; records keep file order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from tfjax.data.folder import CorpusError, LocalDatasetInfo, _read_lines, fingerprint
from tfjax.data.task_folders import find_task_splits

# Field names go into the build directory's name joined by "-", so they must not hold one:
# fields ("a-b", "c") and ("a", "b-c") would otherwise share a build.
_FIELD_NAME = re.compile(r"^\w+$")
_JSON_TYPES = {
    str: "a string",
    dict: "an object",
    list: "an array",
    bool: "a boolean",
    type(None): "null",
}


def find_jsonl_splits(folder: epath.PathLike) -> dict[str, str]:
    """Maps each split name to its file `<split>.jsonl` or `<split>.jsonl.gz`.

    Raises FileNotFoundError when there is none, ValueError when a split has both forms.
    """
    return find_task_splits(folder, "jsonl")


def is_jsonl_folder(folder: epath.PathLike) -> bool:
    """Whether `folder` holds any `*.jsonl` or `*.jsonl.gz` file (and so is read as JSONL)."""
    # Any such file, not only well-named ones: a badly named split should fail in
    # find_jsonl_splits with a JSONL message, not as a folder of line-aligned text.
    return any(
        path.name.endswith((".jsonl", ".jsonl.gz")) and path.is_file()
        for path in epath.Path(folder).iterdir()
    )


def _json_type(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_value(path: str, number: int, record: dict, field: str) -> str:
    """The string value of `field` in the record of line `number`, or a CorpusError."""
    if field not in record:
        raise CorpusError(path, number, f"no field {field!r}; the line has {sorted(record)}")
    value = record[field]
    if not isinstance(value, str):
        raise CorpusError(path, number, f"field {field!r} is {_json_type(value)}, not a string")
    if not value.strip():
        raise CorpusError(path, number, f"field {field!r} is empty")
    try:
        # json accepts escapes of lone surrogates ("\ud800"), which cannot be stored as UTF-8;
        # failing here names the line, where TFDS's encoder would not.
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        problem = f"field {field!r} has a lone surrogate escape at character {e.start}"
        raise CorpusError(path, number, problem) from e
    return value


def read_jsonl(path: str, fields: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yields {field: value} for `fields` of each JSON object line, checking as it reads.

    Raises CorpusError naming the file and line for invalid UTF-8 or JSON, a line that is
    not an object, a field that is missing, not a string or empty, and a file that is empty
    or only blank lines. Values are kept exactly as they are; other fields are ignored.
    """
    seen = False
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # e.msg without json's "line 1": the file's line number is the one that helps.
            raise CorpusError(path, number, f"invalid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(record, dict):
            problem = f"the line is {_json_type(record)}, not a JSON object"
            raise CorpusError(path, number, problem)
        seen = True
        yield {field: _check_value(path, number, record, field) for field in fields}
    if not seen:
        raise CorpusError(path, 1, "file has only blank lines; expected one JSON object per line")


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
    """Which folder and fields a JsonlFolder builds (TFDS needs defaults)."""

    folder: str = ""
    fields: tuple[str, ...] = ()


class JsonlFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a folder of JSONL files into TFDS splits of {field: text} examples."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # No checksums file to find; see ParallelTextFolder in folder.py.

    def _info(self) -> tfds.core.DatasetInfo:
        features = {field: tfds.features.Text() for field in self.builder_config.fields}
        return LocalDatasetInfo(
            builder=self,
            description=f"JSON Lines files from {self.builder_config.folder}.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # Record i is example i, so outputs match by index.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the files are local.
        splits = find_jsonl_splits(self.builder_config.folder)
        return {split: self._generate_examples(path) for split, path in splits.items()}

    def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
        yield from enumerate(read_jsonl(path, self.builder_config.fields))


def build_jsonl_folder(
    folder: epath.PathLike, fields: tuple[str, str], data_dir: str | None
) -> str:
    """Builds `folder` into `data_dir` unless an up-to-date build is there; returns its path.

    The build lives in `<data_dir>/jsonl_folder/<folder name>-<field>-<field>-<fingerprint>/`;
    changing, adding or touching a file changes the fingerprint and so triggers a new build.
    """
    folder = epath.Path(folder).expanduser().resolve()
    for field in fields:
        if not _FIELD_NAME.match(field):
            raise ValueError(f"JSONL field name {field!r} must be letters, digits and _")
    if len(set(fields)) != len(fields):
        raise ValueError(f"the two JSONL fields must differ; got {fields}")
    fields = tuple(sorted(fields))  # One build serves both directions.
    splits = find_jsonl_splits(folder)
    slug = re.sub(r"\W+", "_", folder.name).strip("_") or "corpus"
    stamp = fingerprint(list(splits.values()))
    config = JsonlConfig(
        name=f"{slug}-{'-'.join(fields)}-{stamp}", folder=str(folder), fields=fields
    )
    builder = JsonlFolder(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
