"""The fast training input: first-fit packing against grain's, the index stream, the token cache."""

import functools
import json
import logging

import grain
import numpy as np
import pytest
from conftest import with_decoder_inputs

from tfjax import data
from tfjax.data import pipeline, synthetic, token_cache
from tfjax.data.packing import PackedBatches, PipelineStateError

LENGTHS = {"inputs": 48, "targets": 56}


@pytest.fixture(scope="module")
def source():
    pairs = synthetic.generate_splits("de", seed=7, train_size=600, eval_size=1)["train"]
    return [{"source": s, "target": t} for s, t in pairs]


@pytest.fixture(scope="module")
def tokenizer(source):
    texts = [x for example in source for x in example.values()]
    return data.train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def examples(source, tokenizer):
    return pipeline._read_and_tokenize(source, tokenizer, list(range(len(source))))


def chunked(examples, size=50):
    return grain.MapDataset.source(
        [examples[i : i + size] for i in range(0, len(examples), size)]
    ).to_iter_dataset()


def ours(examples, pack=True, rows=8):
    limit = pipeline.LengthLimit(LENGTHS).keep_fitting
    return PackedBatches(chunked(examples), rows=rows, lengths=LENGTHS, pack=pack, limit=limit)


def test_packing_equals_grains_first_fit(examples):
    """grain's FirstFitPackIterDataset (bins unshuffled) + batch_and_pad is the reference."""
    fitting = pipeline.LengthLimit(LENGTHS).keep_fitting(examples)
    assert len(fitting) < len(examples)  # some are dropped as over-long
    reference = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(fitting).to_iter_dataset(),
        length_struct=LENGTHS,
        num_packing_bins=8,
        shuffle_bins=False,
    )
    batch_fn = functools.partial(grain.experimental.batch_and_pad, batch_size=8)
    reference = reference.batch(8, batch_fn=batch_fn).map(with_decoder_inputs)
    expected, got = list(reference), list(ours(examples))
    assert len(got) == len(expected) > 10
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert max(b["inputs_segment_ids"].max() for b in got) >= 3  # rows really hold several


def padded(examples, rows):
    """examples one per row, zeros after them and in the rows they do not fill."""
    batch = {key: np.zeros((rows, n), np.int32) for key, n in LENGTHS.items()}
    for row, example in enumerate(examples):
        for key in LENGTHS:
            batch[key][row, : len(example[key])] = example[key]
    return batch


def test_unpacked_rows_equal_the_padded_batches(examples):
    fitting = pipeline.LengthLimit(LENGTHS).keep_fitting(examples)
    got = list(ours(examples, pack=False, rows=16))
    assert len(got) == -(-len(fitting) // 16)
    for k, batch in enumerate(got):
        expected = with_decoder_inputs(padded(fitting[16 * k : 16 * (k + 1)], 16))
        assert batch.keys() == expected.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def test_resume_mid_chunk_gives_the_same_batches(examples):
    iterator = iter(ours(examples))
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    assert state["next"] > 0  # the position falls inside a chunk
    rest = list(iterator)
    resumed = iter(ours(examples))
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(rest, again, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_position_saved_by_another_pipeline_is_refused_untouched(examples):
    iterator = iter(ours(examples))
    first = next(iterator)
    fresh = iter(ours(examples))
    with pytest.raises(PipelineStateError):  # grain FlatMap's shape, as older versions saved
        fresh.set_state({"parent": {"next_index": 3}, "next_index_in_buffer": 5})
    assert all(np.array_equal(first[k], v) for k, v in next(fresh).items())


@pytest.mark.parametrize("shuffle", [True, False])
def test_index_chunks_are_epochs_of_the_shard(shuffle):
    shard = range(1, 31, 3)  # process 1 of 3 over 31 examples: 10 indices
    chunks = pipeline.IndexChunks(shard, 4, seed=5, shuffle=shuffle, num_epochs=3)
    assert len(chunks) == 8  # ceil(30 / 4)
    stream = np.concatenate([chunks[k] for k in range(len(chunks))])
    epochs = stream.reshape(3, 10)
    for epoch in epochs:
        assert sorted(epoch) == list(shard)
    if shuffle:
        assert len({tuple(e) for e in epochs}) == 3  # each epoch in its own order
        other = pipeline.IndexChunks(shard, 4, seed=6, shuffle=True, num_epochs=3)
        assert not np.array_equal(other[0], chunks[0])
    else:
        assert (epochs == list(shard)).all()
    endless = pipeline.IndexChunks(shard, 4, seed=5, shuffle=shuffle, num_epochs=None)
    # The last finite chunk holds the stream's last 2; the endless one runs on into epoch 4.
    assert len(chunks[7]) == 2 and np.array_equal(endless[7][:2], chunks[7])
    assert len(endless[7]) == 4 and set(endless[7][2:]) <= set(shard)


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_the_token_cache_gives_the_batches_of_the_text(source, tokenizer, tmp_path, shard):
    options = data.PipelineOptions(
        batch_size=8,
        max_source_len=48,
        max_target_len=56,
        process_index=shard[0],
        process_count=shard[1],
    )
    cached = data.tokenized_train_split(source, tokenizer, options, tmp_path, identity="t")
    assert isinstance(cached, token_cache.TokenizedSplit) and cached.shard == shard
    positions = list(range(len(cached)))
    indices = list(range(shard[0], len(source), shard[1]))
    expected = pipeline._read_and_tokenize(source, tokenizer, indices)
    for a, b in zip(expected, cached.examples(positions), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    from_text = iter(data.train_dataset(source, tokenizer, options))
    from_cache = iter(data.train_dataset(cached, tokenizer, options))
    for _ in range(30):  # past the first epoch
        a, b = next(from_text), next(from_cache)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_the_token_cache_is_reused_rebuilt_when_damaged_and_optional(
    source, tokenizer, tmp_path, caplog
):
    options = data.PipelineOptions(batch_size=8, max_source_len=48, max_target_len=18)
    first = data.tokenized_train_split(source, tokenizer, options, tmp_path, identity="t")
    (folder,) = [p for p in tmp_path.iterdir()]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    stamp = (folder / "inputs.ids.npy").stat().st_mtime_ns
    again = data.tokenized_train_split(source, tokenizer, options, tmp_path, identity="t")
    assert (folder / "inputs.ids.npy").stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert len(again) == len(first) == len(source)
    other = data.tokenized_train_split(source, tokenizer, options, tmp_path, identity="u")
    assert len(list(tmp_path.iterdir())) == 2 and len(other) == len(source)  # a new key
    np.save(folder / "targets.ends.npy", np.arange(3))  # damaged: disagrees with meta.json
    with caplog.at_level(logging.WARNING):
        rebuilt = data.tokenized_train_split(source, tokenizer, options, tmp_path, identity="t")
    assert "Rebuilding" in caplog.text
    assert np.array_equal(rebuilt.examples([7])[0]["targets"], first.examples([7])[0]["targets"])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # nothing can be written under it
    with caplog.at_level(logging.WARNING):
        plain = data.tokenized_train_split(source, tokenizer, options, blocked, identity="t")
    assert plain is source and "without a token cache" in caplog.text
