"""Local folders of line-aligned text files: split discovery, the checks, the TFDS build."""

import gzip
import tempfile

import pytest

from tfjax import data


def write(path, lines, newline_at_end=True):
    text = "\n".join(lines) + ("\n" if newline_at_end and lines else "")
    path.write_bytes(text.encode())


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.de", ["Ein Haus.", "Zwei Häuser.", "Drei  Bäume."])
    write(folder / "train.en", ["A house.", "Two houses.", "Three trees."], newline_at_end=False)
    write(folder / "test_2016_flickr.de", ["Hallo."])
    write(folder / "test_2016_flickr.en", ["Hello."])
    with gzip.open(folder / "val.de.gz", "wt", encoding="utf-8") as f:
        f.write("Guten Morgen.\nGute Nacht.\n")
    with gzip.open(folder / "val.en.gz", "wt", encoding="utf-8") as f:
        f.write("Good morning.\nGood night.\n")
    write(folder / "train.attribution", ["ignored: not a language of the pair"])
    return folder


def test_find_splits(corpus):
    splits = data.find_splits(corpus, ("en", "de"))
    assert sorted(splits) == ["test_2016_flickr", "train", "val"]
    assert splits["val"] == (str(corpus / "val.en.gz"), str(corpus / "val.de.gz"))


def test_read_parallel_plain_gz_and_no_final_newline(corpus):
    pairs = list(data.read_parallel((str(corpus / "train.de"), str(corpus / "train.en"))))
    assert pairs[2] == ("Drei  Bäume.", "Three trees.")
    assert len(pairs) == 3
    val = list(data.read_parallel((str(corpus / "val.de.gz"), str(corpus / "val.en.gz"))))
    assert val == [("Guten Morgen.", "Good morning."), ("Gute Nacht.", "Good night.")]


def test_crlf_bom_and_unicode_line_separators(tmp_path):
    (tmp_path / "a.de").write_bytes("\ufeffeins\r\nzwei\u2028drei\r\n".encode())
    (tmp_path / "a.en").write_bytes(b"one\ntwo\n")
    pairs = list(data.read_parallel((str(tmp_path / "a.de"), str(tmp_path / "a.en"))))
    # U+2028 is text inside a sentence, not a line break: alignment holds.
    assert pairs == [("eins", "one"), ("zwei\u2028drei", "two")]


def test_unequal_line_counts_name_file_and_line(corpus):
    write(corpus / "train.en", ["A house.", "Two houses."])
    with pytest.raises(data.CorpusError) as info:
        list(data.read_parallel((str(corpus / "train.de"), str(corpus / "train.en"))))
    assert info.value.path == str(corpus / "train.en")
    assert info.value.line == 3
    assert f"{corpus / 'train.en'}:3:" in str(info.value)
    assert str(corpus / "train.de") in str(info.value)


def test_empty_file_is_an_error(corpus):
    write(corpus / "train.de", [])
    with pytest.raises(data.CorpusError, match=r"train\.de:1: file is empty"):
        list(data.read_parallel((str(corpus / "train.de"), str(corpus / "train.en"))))


def test_invalid_utf8_names_file_and_line(corpus):
    (corpus / "train.en").write_bytes(b"A house.\nTwo \xff houses.\nThree trees.\n")
    with pytest.raises(data.CorpusError) as info:
        list(data.read_parallel((str(corpus / "train.de"), str(corpus / "train.en"))))
    assert (info.value.path, info.value.line) == (str(corpus / "train.en"), 2)
    assert "invalid UTF-8 at byte 4" in str(info.value)


def test_missing_partner_file(corpus):
    write(corpus / "dev.de", ["Nur Deutsch."])
    with pytest.raises(data.CorpusError, match=r"dev\.de:1: no partner file dev\.en"):
        data.find_splits(corpus, ("de", "en"))


def test_plain_and_gz_of_the_same_split(corpus):
    write(corpus / "val.de", ["Guten Morgen."])
    with pytest.raises(ValueError, match=r"val\.de and .*val\.de\.gz are both val\.de"):
        data.find_splits(corpus, ("de", "en"))


def test_no_pair_at_all(tmp_path):
    write(tmp_path / "train.fr", ["Bonjour."])
    with pytest.raises(FileNotFoundError, match="no <split>.de / <split>.en pair"):
        data.find_splits(tmp_path, ("de", "en"))


def test_prepare_builds_and_reads_back_in_order(corpus, tmp_path):
    built = data.prepare(
        str(corpus), source_lang="en", target_lang="de", data_dir=str(tmp_path / "tfds")
    )
    assert built.split_sizes == {"train": 3, "val": 2, "test_2016_flickr": 1}
    train = built.source("train")
    assert [train[i] for i in range(3)] == [
        {"source": "A house.", "target": "Ein Haus."},
        {"source": "Two houses.", "target": "Zwei Häuser."},
        {"source": "Three trees.", "target": "Drei  Bäume."},
    ]
    assert train.__getitems__([2, 0]) == [train[2], train[0]]
    # The same build, read the other way round.
    reverse = data.prepare(
        str(corpus), source_lang="de", target_lang="en", data_dir=str(tmp_path / "tfds")
    )
    assert reverse.builder_dir == built.builder_dir
    assert reverse.source("val")[1] == {"source": "Gute Nacht.", "target": "Good night."}


def test_prepare_rebuilds_when_a_file_changes(corpus, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    first = data.prepare(str(corpus), source_lang="de", target_lang="en", data_dir=tfds_dir)
    write(corpus / "val.de", ["Neu."])
    write(corpus / "val.en", ["New."])
    (corpus / "val.de.gz").unlink()
    (corpus / "val.en.gz").unlink()
    second = data.prepare(str(corpus), source_lang="de", target_lang="en", data_dir=tfds_dir)
    assert second.builder_dir != first.builder_dir
    assert second.source("val")[0] == {"source": "Neu.", "target": "New."}


def test_bad_file_fails_the_build_and_names_it(corpus, tmp_path):
    (corpus / "train.de").write_bytes(b"Ein Haus.\n\xc3\x28\nDrei.\n")
    with pytest.raises(data.CorpusError, match=r"train\.de:2: invalid UTF-8"):
        data.prepare(str(corpus), source_lang="de", target_lang="en", data_dir=str(tmp_path))


def test_build_leaves_nothing_in_the_temp_directory(corpus, tmp_path, monkeypatch):
    # TFDS's own DatasetInfo makes an empty folder there for each unprepared build.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data.prepare(str(corpus), source_lang="en", target_lang="de", data_dir=str(tmp_path / "tfds"))
    assert list(scratch.iterdir()) == []
