"""The sentencepiece tokenizer: fixed special ids, round trip, save/load, train-once."""

import pickle

import numpy as np
import pytest

from tfjax import data
from tfjax.data import synthetic
from tfjax.data.tokenizer import traditional_to_simplified

EXTRA = ["Grüße aus Köln, 3,5 °C.", "你好，世界！", "Ça coûte 12 €."]


@pytest.fixture(scope="module")
def corpus():
    pairs = synthetic.generate_splits("zh", seed=1, train_size=1000, eval_size=10)["train"]
    return [text for pair in pairs for text in pair] + EXTRA


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.train_tokenizer(corpus, vocab_size=400)


def test_fixed_special_ids(tokenizer):
    assert (data.PAD_ID, data.UNK_ID, data.BOS_ID, data.EOS_ID) == (0, 1, 2, 3)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_encode_ends_with_eos_and_never_uses_pad(tokenizer, corpus):
    for text in corpus[:50]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids[-1] == data.EOS_ID
        assert data.PAD_ID not in ids and data.BOS_ID not in ids
    assert data.EOS_ID not in tokenizer.encode("zwei", add_eos=False)


def test_round_trip(tokenizer, corpus):
    for text in corpus:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unseen_characters_round_trip_as_bytes(tokenizer):
    text = "Ünïcödé 龘 🙂 ž"
    ids = tokenizer.encode(text)
    assert data.UNK_ID not in ids
    assert tokenizer.decode(ids) == text


def test_extra_whitespace_is_collapsed(tokenizer):
    # Documented: sentencepiece keeps no leading, trailing or repeated spaces.
    assert tokenizer.decode(tokenizer.encode("  eins  zwei ")) == "eins zwei"


def test_decode_stops_at_eos_and_skips_pad_and_bos(tokenizer):
    ids = tokenizer.encode("drei", add_eos=False).tolist()
    junk = tokenizer.encode("vier").tolist()
    assert tokenizer.decode([data.BOS_ID, *ids, data.EOS_ID, *junk, 0, 0]) == "drei"
    assert tokenizer.decode(np.array([*ids, 0, 0])) == "drei"


def test_encode_batch_matches_encode(tokenizer, corpus):
    batch = tokenizer.encode_batch(corpus[:20])
    assert all(
        np.array_equal(a, tokenizer.encode(t)) for a, t in zip(batch, corpus[:20], strict=True)
    )


def test_vocab_size_is_an_upper_bound(tokenizer):
    assert 260 < tokenizer.vocab_size <= 400


def test_save_load_and_pickle(tokenizer, tmp_path, corpus):
    path = tmp_path / "sub" / "spm.model"
    tokenizer.save(path)
    loaded = data.Tokenizer.load(path)
    unpickled = pickle.loads(pickle.dumps(tokenizer))
    for other in (loaded, unpickled):
        assert other.vocab_size == tokenizer.vocab_size
        assert np.array_equal(other.encode(corpus[0]), tokenizer.encode(corpus[0]))


class _Untouchable:
    """A training split that fails if read: proves the saved model is reused."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise AssertionError("the tokenizer was retrained")


def test_load_or_train_trains_once(tmp_path):
    pairs = synthetic.generate_splits("de", seed=2, train_size=300, eval_size=1)["train"]
    source = [{"source": s, "target": t} for s, t in pairs]
    path = tmp_path / "workdir" / "spm.model"
    trained = data.load_or_train_tokenizer(path, source, vocab_size=300, max_pairs=200)
    assert path.exists()
    loaded = data.load_or_train_tokenizer(path, _Untouchable(), vocab_size=300)
    assert np.array_equal(loaded.encode(pairs[0][1]), trained.encode(pairs[0][1]))
    with pytest.raises(ValueError, match="more than vocab_size=100"):
        data.load_or_train_tokenizer(path, _Untouchable(), vocab_size=100)


def test_a_file_that_is_not_a_model_is_named(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(b"not a model\n")
    with pytest.raises(
        ValueError, match=f"{path}: not a sentencepiece model .*remove it to train a new one"
    ):
        data.load_or_train_tokenizer(path, _Untouchable(), vocab_size=300)
    assert path.read_bytes() == b"not a model\n"  # left as it was: never retrained over


def test_rejects_models_with_other_special_ids():
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["eins zwei drei"] * 20), model_writer=model, vocab_size=12
    )
    with pytest.raises(ValueError, match="pad, unk, bos, eos ids"):
        data.Tokenizer(model.getvalue())


def test_a_vocabulary_too_small_for_the_characters_is_a_clear_error():
    # 400 distinct CJK characters cannot fit in 270 ids with 260 taken by specials and bytes.
    sentences = [f"abc {chr(0x4E00 + i)}" for i in range(400)]
    with pytest.raises(ValueError, match="vocab_size=270 is too small.*raise vocab_size"):
        data.train_tokenizer(sentences, vocab_size=270)


# Traditional -> Simplified pairs written out by hand, and a sentence in both scripts.
HAND_PAIRS = {"國": "国", "們": "们", "愛": "爱", "見": "见", "說": "说", "車": "车", "門": "门"}
TRADITIONAL, SIMPLIFIED = "我們明天開車去見他，好嗎？", "我们明天开车去见他，好吗？"


@pytest.fixture(scope="module")
def zh_hans(corpus):
    return data.train_tokenizer(corpus + [TRADITIONAL], vocab_size=400, normalization="zh_hans")


def test_zh_hans_rules_hold_the_hand_written_pairs():
    rules = dict(traditional_to_simplified())
    assert {t: rules.get(t) for t in HAND_PAIRS} == HAND_PAIRS
    assert all(len(t) == len(s) == 1 and t != s for t, s in rules.items())
    assert not set(SIMPLIFIED) & set(rules)  # Simplified characters stay as they are


def test_zh_hans_reads_traditional_as_simplified(zh_hans, tokenizer):
    assert zh_hans.normalization == "zh_hans" and tokenizer.normalization == "identity"
    assert np.array_equal(zh_hans.encode(TRADITIONAL), zh_hans.encode(SIMPLIFIED))
    assert zh_hans.decode(zh_hans.encode(TRADITIONAL)) == SIMPLIFIED
    assert tokenizer.decode(tokenizer.encode(TRADITIONAL)) == TRADITIONAL  # identity keeps it
    for text in EXTRA:  # everything else as identity: accents, full-width "，" and "！", "€"
        assert zh_hans.decode(zh_hans.encode(text)) == text
    restored = pickle.loads(pickle.dumps(zh_hans))  # the rules live in the model proto
    assert restored.normalization == "zh_hans"
    assert np.array_equal(restored.encode(TRADITIONAL), zh_hans.encode(SIMPLIFIED))


def test_load_or_train_refuses_a_tokenizer_of_another_normalization(tmp_path, zh_hans):
    path = tmp_path / "spm.model"
    zh_hans.save(path)
    with pytest.raises(ValueError, match="trained with tokenizer_normalization='zh_hans'"):
        data.load_or_train_tokenizer(path, _Untouchable(), vocab_size=400)
    loaded = data.load_or_train_tokenizer(
        path, _Untouchable(), vocab_size=400, normalization="zh_hans"
    )
    assert loaded.model_proto == zh_hans.model_proto
    with pytest.raises(ValueError, match="normalization='nfkc' must be one of"):
        data.train_tokenizer(["a b c"], vocab_size=300, normalization="nfkc")
