"""Labelled TSV and plain text task folders: split discovery, the checks, the TFDS build."""

import gzip
import os

import pytest

from tfjax.data.folder import CorpusError
from tfjax.data.task_folders import (
    TaskData,
    build_labelled_folder,
    find_task_splits,
    label_names,
    prepare_task,
    read_labelled,
    read_text,
)


def write(path, lines):
    path.write_bytes(("\n".join(lines) + "\n").encode() if lines else b"")


@pytest.fixture
def sst(tmp_path):
    folder = tmp_path / "sst"
    folder.mkdir()
    write(folder / "train.tsv", ["label\tsentence", "0\tdull .", "1\t一部好电影 。", "1\twitty ."])
    write(folder / "dev.tsv", ["sentence\tlabel", "fine .\t1"])
    with gzip.open(folder / "test.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("label\tsentence\n0\tbad .\n1\tgood .\n")
    return folder


def assert_names(error, path, line):
    assert (error.path, error.line) == (str(path), line)
    assert str(error).startswith(f"{path}:{line}: ")


def test_find_task_splits_plain_and_gz(sst):
    write(sst / "notes.txt", ["not a tsv"])
    assert find_task_splits(sst, "tsv") == {
        "dev": str(sst / "dev.tsv"),
        "test": str(sst / "test.tsv.gz"),
        "train": str(sst / "train.tsv"),
    }


def test_find_task_splits_both_forms_and_none(sst, tmp_path):
    write(sst / "test.tsv", ["label\tsentence", "0\tbad ."])
    with pytest.raises(ValueError, match=r"test\.tsv and .*test\.tsv\.gz are both the 'test'"):
        find_task_splits(sst, "tsv")
    with pytest.raises(FileNotFoundError, match=r"no <split>\.txt or <split>\.txt\.gz files"):
        find_task_splits(sst, "txt")


def test_read_labelled_extra_columns_crlf_bom_and_chinese(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes("\ufeffid\tsentence\tsource\tlabel\r\n7\t很好 。\tweb\tpos\r\n".encode())
    assert list(read_labelled(str(path))) == [("pos", "很好 。")]


@pytest.mark.parametrize(
    "lines, line, problem",
    [
        ([], 1, "file is empty"),
        (["label\ttext", "0\tx"], 1, "header has no 'sentence' column; expected label<TAB>"),
        (["sentence", "x"], 1, "header has no 'label' column"),
        (["label\tsentence", "0\tok", "1"], 3, "1 tab-separated columns but the header has 2"),
        (["label\tsentence", " \tno label"], 2, "empty label"),
        (["label\tsentence", "0\t  "], 2, "empty sentence"),
        (["label\tsentence"], 2, "file has a header but no examples"),
    ],
)
def test_read_labelled_errors_name_file_and_line(tmp_path, lines, line, problem):
    path = tmp_path / "train.tsv"
    write(path, lines)
    with pytest.raises(CorpusError, match=problem) as info:
        list(read_labelled(str(path)))
    assert_names(info.value, path, line)


def test_read_labelled_invalid_utf8(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"label\tsentence\n0\tok\n1\tbad \xff\n")
    with pytest.raises(CorpusError, match="invalid UTF-8") as info:
        list(read_labelled(str(path)))
    assert_names(info.value, path, 3)


def test_label_names_sort(tmp_path):
    path = tmp_path / "train.tsv"
    write(path, ["label\tsentence", "10\ta", "2\tb", "2\tc", "0\td"])
    assert label_names(str(path)) == ("0", "2", "10")
    write(path, ["label\tsentence", "pos\ta", "neg\tb", "10\tc"])
    assert label_names(str(path)) == ("10", "neg", "pos")


def test_build_and_read_back_in_order(sst, tmp_path):
    data = prepare_task(str(sst), "tsv", str(tmp_path / "tfds"))
    assert data.split_sizes == {"train": 3, "dev": 1, "test": 2}
    assert data.label_names == ("0", "1")
    train = data.source("train")
    assert train.examples() == [
        {"source": "dull .", "label": 0},
        {"source": "一部好电影 。", "label": 1},
        {"source": "witty .", "label": 1},
    ]
    assert train.__getitems__([2, 0]) == [train[2], train[0]]
    assert data.source("dev")[0] == {"source": "fine .", "label": 1}
    with pytest.raises(ValueError, match=r"split 'val' not in .*\['dev', 'test', 'train'\]"):
        data.source("val")
    # The build directory is itself a prepared dataset.
    assert prepare_task(data.builder_dir, "tsv").split_sizes == data.split_sizes


def test_unknown_label_outside_train_names_its_line(sst, tmp_path):
    write(sst / "dev.tsv", ["label\tsentence", "1\tfine .", "2\tunseen ."])
    with pytest.raises(CorpusError, match=r"label '2' is not a label of .*\['0', '1'\]") as info:
        build_labelled_folder(sst, str(tmp_path / "tfds"))
    assert_names(info.value, sst / "dev.tsv", 3)


def test_rebuild_only_when_a_file_changes(sst, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    first = build_labelled_folder(sst, tfds_dir)
    assert "/labelled_text_folder/sst-" in first
    assert build_labelled_folder(sst, tfds_dir) == first
    stat = os.stat(sst / "dev.tsv")
    os.utime(sst / "dev.tsv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = build_labelled_folder(sst, tfds_dir)
    assert touched != first
    write(sst / "dev.tsv", ["label\tsentence", "0\tnew ."])
    changed = TaskData(build_labelled_folder(sst, tfds_dir))
    assert changed.builder_dir not in (first, touched)
    assert changed.source("dev").examples() == [{"source": "new .", "label": 0}]


def test_missing_train_and_missing_folder(sst, tmp_path):
    (sst / "train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"no train\.tsv\[\.gz\]; .*\['dev', 'test'\]"):
        prepare_task(sst, "tsv", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        prepare_task(tmp_path / "nowhere", "text", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv is a file, not a folder$"):
        prepare_task(sst / "dev.tsv", "tsv", str(tmp_path))
    with pytest.raises(ValueError, match="task kind must be one of"):
        prepare_task(sst, "csv", str(tmp_path))


def test_plain_text_skips_blank_lines_and_reads_back_in_order(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    write(folder / "train.txt", ["", " = Title = ", "   ", "第一行 。", "last line"])
    with gzip.open(folder / "valid.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\nvalid one\n")
    assert list(read_text(str(folder / "train.txt"))) == ["= Title =", "第一行 。", "last line"]
    data = prepare_task(folder, "text", str(tmp_path / "tfds"))
    assert "/plain_text_folder/wiki-" in data.builder_dir
    assert data.split_sizes == {"train": 3, "valid": 1}
    assert data.label_names == ()
    assert data.source("train").examples() == [
        {"source": "= Title ="},
        {"source": "第一行 。"},
        {"source": "last line"},
    ]
    assert data.source("valid")[0] == {"source": "valid one"}


@pytest.mark.parametrize(
    "content, problem", [(b"", "file is empty"), (b"\n  \n\t\n", "file has no text; expected one")]
)
def test_plain_text_without_text_is_an_error(tmp_path, content, problem):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=problem) as info:
        list(read_text(str(path)))
    assert_names(info.value, path, 1)
