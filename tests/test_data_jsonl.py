"""JSONL folders (e.g. SAMSum): split discovery, the checks, the TFDS build via prepare()."""

import gzip
import json

import pytest

from tfjax import data
from tfjax.data.folder import CorpusError
from tfjax.data.jsonl_folder import (
    build_jsonl_folder,
    find_jsonl_splits,
    is_jsonl_folder,
    read_jsonl,
)

FIELDS = ("dialogue", "summary")
TRAIN = [
    {"id": "1", "dialogue": "Amanda: cookies?\r\nJerry: Sure!", "summary": "Jerry wants some."},
    {"id": "2", "dialogue": "Olivia: vote?\nOlivia:  Liberals ", "summary": " Olivia votes. "},
    {"id": "3", "dialogue": "Tim: 你好", "summary": "Tim greets.", "extra": [1, 2]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@pytest.fixture
def samsum(tmp_path):
    folder = tmp_path / "samsum"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN)
    with gzip.open(folder / "validation.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"dialogue": "A: hi", "summary": "A greets."}) + "\n")
    write_jsonl(folder / "test.jsonl", [{"dialogue": "B: bye", "summary": "B leaves."}])
    (folder / "README.txt").write_text("not a split")
    return folder


def test_find_splits_and_is_jsonl_folder(samsum, tmp_path):
    assert find_jsonl_splits(samsum) == {
        "test": str(samsum / "test.jsonl"),
        "train": str(samsum / "train.jsonl"),
        "validation": str(samsum / "validation.jsonl.gz"),
    }
    assert is_jsonl_folder(samsum)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.en").write_text("Hello.\n")
    assert not is_jsonl_folder(tmp_path / "text")
    with pytest.raises(FileNotFoundError, match=r"no <split>\.jsonl or <split>\.jsonl\.gz"):
        find_jsonl_splits(tmp_path / "text")
    (samsum / "test.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))
    with pytest.raises(ValueError, match=r"test\.jsonl and .*test\.jsonl\.gz are both the 'test'"):
        find_jsonl_splits(samsum)


def test_read_keeps_values_verbatim_and_ignores_other_fields(samsum):
    records = list(read_jsonl(str(samsum / "train.jsonl"), FIELDS))
    assert records == [{field: r[field] for field in FIELDS} for r in TRAIN]
    assert records[0]["dialogue"] == "Amanda: cookies?\r\nJerry: Sure!"
    assert records[1]["summary"] == " Olivia votes. "  # Nothing stripped.
    gz = list(read_jsonl(str(samsum / "validation.jsonl.gz"), ("summary",)))
    assert gz == [{"summary": "A greets."}]


def test_blank_lines_crlf_and_bom(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('\ufeff{"s": "a"}\r\n\r\n  \n{"s": "b\\r\\nc"}'.encode())
    assert list(read_jsonl(str(path), ("s",))) == [{"s": "a"}, {"s": "b\r\nc"}]


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b'{"s": "a"}\n{"s": "b"\n', 2, r"invalid JSON: Expecting ',' delimiter at column 10"),
        (b'{"s": "a"}\n\n["s"]\n', 3, "the line is an array, not a JSON object"),
        (b'"s"\n', 1, "the line is a string, not a JSON object"),
        (b'{"s": "a", "t": "x"}\n{"t": "x", "id": "2"}\n', 2, r"no field 's'; .*\['id', 't'\]"),
        (b'{"s": 3}\n', 1, "field 's' is a number, not a string"),
        (b'{"s": null}\n', 1, "field 's' is null, not a string"),
        (b'{"s": " \\n\\t "}\n', 1, "field 's' is empty"),
        (b'{"s": "\\ud800"}\n', 1, "field 's' has a lone surrogate"),
        (b'{"s": "a"}\n{"s": "\xff"}\n', 2, "invalid UTF-8 at byte 7"),
        (b"", 1, "file is empty"),
        (b"\n  \n\n", 1, "file has only blank lines"),
    ],
)
def test_errors_name_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=problem) as info:
        list(read_jsonl(str(path), ("s",)))
    assert (info.value.path, info.value.line) == (str(path), line)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_prepare_builds_and_reads_back_in_order_both_ways(samsum, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    built = data.prepare(
        str(samsum), source_lang="dialogue", target_lang="summary", data_dir=tfds_dir
    )
    assert isinstance(built, data.TranslationData)
    assert "/jsonl_folder/samsum-dialogue-summary-" in built.builder_dir
    assert built.split_sizes == {"train": 3, "validation": 1, "test": 1}
    assert built.source("train").examples() == [
        {"source": r["dialogue"], "target": r["summary"]} for r in TRAIN
    ]
    reverse = data.prepare(
        str(samsum), source_lang="summary", target_lang="dialogue", data_dir=tfds_dir
    )
    assert reverse.builder_dir == built.builder_dir
    assert reverse.source("validation")[0] == {"source": "A greets.", "target": "A: hi"}


def test_prepare_with_a_missing_field_names_file_and_line(samsum, tmp_path):
    # The first split built (in name order) fails on its first line, before any record.
    problem = r"test\.jsonl:1: no field 'summry'; the line has \['dialogue', 'summary'\]"
    with pytest.raises(CorpusError, match=problem):
        data.prepare(
            str(samsum), source_lang="dialogue", target_lang="summry", data_dir=str(tmp_path)
        )


def test_bad_field_names(samsum, tmp_path):
    with pytest.raises(ValueError, match="must differ"):
        build_jsonl_folder(samsum, ("summary", "summary"), str(tmp_path))
    with pytest.raises(ValueError, match="field name 'a-b' must be"):
        build_jsonl_folder(samsum, ("a-b", "summary"), str(tmp_path))


def test_prepare_rebuilds_when_a_file_changes(samsum, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    first = build_jsonl_folder(samsum, FIELDS, tfds_dir)
    assert build_jsonl_folder(samsum, FIELDS[::-1], tfds_dir) == first
    write_jsonl(samsum / "test.jsonl", [{"dialogue": "C: new", "summary": "C is new."}] * 2)
    second = data.prepare(
        str(samsum), source_lang="dialogue", target_lang="summary", data_dir=tfds_dir
    )
    assert second.builder_dir != first
    assert second.split_sizes["test"] == 2
    assert second.source("test")[1] == {"source": "C: new", "target": "C is new."}
