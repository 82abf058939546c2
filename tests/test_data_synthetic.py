"""The synthetic number-words task: hand-checked translations, splits, and its TFDS build."""

import pytest
import tensorflow_datasets as tfds

from tfjax.data import synthetic


@pytest.mark.parametrize(
    "n, english, german, chinese",
    [
        (0, "zero", "null", "零"),
        (1, "one", "eins", "一"),
        (10, "ten", "zehn", "十"),
        (15, "fifteen", "fünfzehn", "十五"),
        (16, "sixteen", "sechzehn", "十六"),
        (17, "seventeen", "siebzehn", "十七"),
        (20, "twenty", "zwanzig", "二十"),
        (21, "twenty-one", "einundzwanzig", "二十一"),
        (34, "thirty-four", "vierunddreißig", "三十四"),
        (99, "ninety-nine", "neunundneunzig", "九十九"),
        (100, "one hundred", "einhundert", "一百"),
        (101, "one hundred one", "einhunderteins", "一百零一"),
        (105, "one hundred five", "einhundertfünf", "一百零五"),
        (110, "one hundred ten", "einhundertzehn", "一百一十"),
        (115, "one hundred fifteen", "einhundertfünfzehn", "一百一十五"),
        (200, "two hundred", "zweihundert", "二百"),
        (342, "three hundred forty-two", "dreihundertzweiundvierzig", "三百四十二"),
        (999, "nine hundred ninety-nine", "neunhundertneunundneunzig", "九百九十九"),
    ],
)
def test_numbers_by_hand(n, english, german, chinese):
    assert synthetic.english(n) == english
    assert synthetic.german(n) == german
    assert synthetic.chinese(n) == chinese


@pytest.mark.parametrize("say", [synthetic.english, synthetic.german, synthetic.chinese])
def test_every_number_has_its_own_words(say):
    assert len({say(n) for n in range(1000)}) == 1000


def test_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="0..999"):
        synthetic.german(1000)


@pytest.mark.parametrize(
    "language, expected",
    [
        ("en", "thirty-four, one hundred five and twenty"),
        ("de", "vierunddreißig, einhundertfünf und zwanzig"),
        ("zh", "三十四、一百零五和二十"),
    ],
)
def test_sentence_template(language, expected):
    assert synthetic.sentence([34, 105, 20], language) == expected


def test_two_numbers():
    assert synthetic.sentence([7, 21], "de") == "sieben und einundzwanzig"
    assert synthetic.sentence([7, 21], "zh") == "七和二十一"


def test_splits_are_disjoint_sized_and_seeded():
    splits = synthetic.generate_splits("zh", seed=3, train_size=500, eval_size=50)
    assert {k: len(v) for k, v in splits.items()} == {"test": 50, "validation": 50, "train": 500}
    sources = [{source for source, _ in pairs} for pairs in splits.values()]
    assert sum(map(len, sources)) == len(set.union(*sources)) == 600
    assert splits == synthetic.generate_splits("zh", seed=3, train_size=500, eval_size=50)
    assert splits != synthetic.generate_splits("zh", seed=4, train_size=500, eval_size=50)


def test_sentences_stay_short():
    pairs = synthetic.generate_splits("de", seed=0, train_size=2000, eval_size=10)["train"]
    # The longest possible English sentence: three numbers of four words each plus "," "and".
    assert max(len(source.split()) for source, _ in pairs) <= 14
    assert max(len(target.split()) for _, target in pairs) <= 4


def test_unknown_language():
    with pytest.raises(ValueError, match="expected one of"):
        synthetic.generate_splits("fr", seed=0, train_size=1, eval_size=1)


def test_build_reads_back_through_tfds(tmp_path):
    builder_dir = synthetic.build_synthetic(
        "de", str(tmp_path), seed=5, train_size=120, eval_size=10
    )
    builder = tfds.builder_from_directory(builder_dir)
    assert builder.info.file_format.value == "array_record"
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    assert sizes == {"train": 120, "validation": 10, "test": 10}
    expected = synthetic.generate_splits("de", seed=5, train_size=120, eval_size=10)["train"]
    records = builder.as_data_source("train")
    assert [(r["en"].decode(), r["de"].decode()) for r in records] == expected
