"""The grain pipelines: batch contract, packing, determinism, resume, sharding, evaluation."""

import collections
import json
import logging

import numpy as np
import pytest

from tfjax import data
from tfjax.data import synthetic

BOS, EOS = data.BOS_ID, data.EOS_ID
N = 1000  # examples in the test split
PACKED_KEYS = {
    "inputs",
    "targets",
    "decoder_inputs",
    "inputs_segment_ids",
    "inputs_positions",
    "targets_segment_ids",
    "targets_positions",
}


@pytest.fixture(scope="module")
def pairs():
    # grain's index shuffle costs milliseconds per index on tiny datasets; 1000 is quick.
    return synthetic.generate_splits("de", seed=7, train_size=N, eval_size=1)["train"]


@pytest.fixture(scope="module")
def source(pairs):
    return [{"source": s, "target": t} for s, t in pairs]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = synthetic.generate_splits("de", seed=8, train_size=1000, eval_size=1)["train"]
    return data.train_tokenizer([text for pair in corpus for text in pair], vocab_size=500)


@pytest.fixture(scope="module")
def tokenized(source, tokenizer):
    """Each example as (source ids, target ids) tuples."""
    return [
        (tuple(tokenizer.encode(x["source"])), tuple(tokenizer.encode(x["target"]))) for x in source
    ]


def options(**overrides):
    defaults = dict(
        batch_size=4, max_source_len=28, max_target_len=24, process_index=0, process_count=1
    )
    return data.PipelineOptions(**{**defaults, **overrides})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(batches_a, batches_b, strict=True)
    )


def unpack(batch):
    """Yields (source ids, target ids, decoder input ids, positions) per packed segment."""
    for row in range(len(batch["inputs"])):
        segments = batch["inputs_segment_ids"][row]
        for s in range(1, segments.max() + 1):
            src = batch["inputs_segment_ids"][row] == s
            tgt = batch["targets_segment_ids"][row] == s
            yield (
                tuple(batch["inputs"][row][src]),
                tuple(batch["targets"][row][tgt]),
                batch["decoder_inputs"][row][tgt],
                (batch["inputs_positions"][row][src], batch["targets_positions"][row][tgt]),
            )


def unpadded(batch):
    """Yields (source ids, target ids) per row of an unpacked batch, skipping empty rows."""
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        if targets.any():
            yield tuple(inputs[inputs != 0]), tuple(targets[targets != 0])


def test_packed_batch_contract(source, tokenizer):
    batch = next(iter(data.train_dataset(source, tokenizer, options())))
    assert set(batch) == PACKED_KEYS
    for key, value in batch.items():
        length = 28 if key.startswith("inputs") else 24
        assert value.shape == (4, length) and value.dtype == np.int32, key
    shapes = data.train_batch_shapes(4, 28, 24, pack=True)  # what precompile compiles for
    assert shapes == {k: v.shape for k, v in batch.items()}
    segments = batch["inputs_segment_ids"]
    assert ((segments == 0) == (batch["inputs"] == 0)).all()
    assert ((batch["targets_segment_ids"] == 0) == (batch["targets"] == 0)).all()


def test_packing_recovers_every_example_exactly(source, tokenizer, tokenized):
    ds = data.train_dataset(source, tokenizer, options(batch_size=32, num_epochs=1))
    found, most_segments = [], 0
    for batch in ds:
        most_segments = max(most_segments, batch["inputs_segment_ids"].max())
        for inputs, targets, decoder_inputs, (src_pos, tgt_pos) in unpack(batch):
            found.append((inputs, targets))
            assert inputs[-1] == EOS and targets[-1] == EOS
            assert np.array_equal(src_pos, np.arange(len(inputs)))
            assert np.array_equal(tgt_pos, np.arange(len(targets)))
            # The decoder sees bos, then its own segment's targets: nothing from a neighbour.
            assert np.array_equal(decoder_inputs, (BOS, *targets[:-1]))
    assert most_segments >= 2  # rows really are packed
    assert collections.Counter(found) == collections.Counter(tokenized)


def test_decoder_inputs_are_zero_on_padding(source, tokenizer):
    for batch in data.train_dataset(source, tokenizer, options(num_epochs=1)):
        padding = batch["targets_segment_ids"] == 0
        assert (batch["decoder_inputs"][padding] == 0).all()
        starts = (batch["targets_positions"] == 0) & ~padding
        assert (batch["decoder_inputs"][starts] == BOS).all()
        assert (batch["decoder_inputs"][~starts & ~padding] != BOS).all()


def test_unpacked_batches(source, tokenizer, tokenized):
    ds = data.train_dataset(source, tokenizer, options(pack=False, batch_size=64, num_epochs=1))
    batches = list(ds)
    assert len(batches) == 16  # 1000 = 15 * 64 + 40: the last batch has 24 all-pad rows
    assert not batches[-1]["inputs"][40:].any() and batches[-1]["inputs"][39].any()
    assert set(batches[0]) == {"inputs", "targets", "decoder_inputs"}
    shapes = data.train_batch_shapes(64, 28, 24, pack=False)
    assert shapes == {k: v.shape for k, v in batches[0].items()}
    assert all(b["inputs"].shape == (64, 28) and b["targets"].shape == (64, 24) for b in batches)
    found = [example for batch in batches for example in unpadded(batch)]
    assert collections.Counter(found) == collections.Counter(tokenized)
    for targets, decoder_inputs in zip(
        batches[0]["targets"], batches[0]["decoder_inputs"], strict=True
    ):
        n = np.count_nonzero(targets)
        assert np.array_equal(decoder_inputs[:n], (BOS, *targets[: n - 1]))
        assert not decoder_inputs[n:].any()


def test_same_seed_same_batches_other_seed_other_order(source, tokenizer):
    first = take(iter(data.train_dataset(source, tokenizer, options(seed=1))), 6)
    again = take(iter(data.train_dataset(source, tokenizer, options(seed=1))), 6)
    other = take(iter(data.train_dataset(source, tokenizer, options(seed=2))), 6)
    assert same(first, again)
    assert not same(first, other)


def test_each_epoch_is_reshuffled(source, tokenizer, tokenized):
    whole = options(pack=False, batch_size=len(source), num_epochs=2)
    epoch1, epoch2 = list(data.train_dataset(source, tokenizer, whole))
    order1, order2 = list(unpadded(epoch1)), list(unpadded(epoch2))
    assert order1 != order2 and sorted(order1) == sorted(order2) == sorted(tokenized)
    in_order = options(pack=False, batch_size=len(source), shuffle=False)
    assert list(unpadded(next(iter(data.train_dataset(source, tokenizer, in_order))))) == tokenized


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_uninterrupted_batches(source, tokenizer, pack):
    opts = options(pack=pack, batch_size=64 if pack else 128)
    uninterrupted = take(iter(data.train_dataset(source, tokenizer, opts)), 12)
    # 10 batches hold more than one epoch: some resumptions cross an epoch boundary.
    seen = sum(len(list(unpack(b) if pack else unpadded(b))) for b in uninterrupted[:10])
    assert seen > len(source)
    for k in (0, 1, 4, 6, 9):
        interrupted = iter(data.train_dataset(source, tokenizer, opts))
        take(interrupted, k)
        state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
        resumed = iter(data.train_dataset(source, tokenizer, opts))
        resumed.set_state(state)
        assert same(take(resumed, 3), uninterrupted[k : k + 3]), k


def test_train_shards_are_disjoint_and_cover_the_split(source, tokenizer, tokenized):
    shards = []
    for index in range(3):
        opts = options(pack=False, num_epochs=1, process_index=index, process_count=3)
        shards.append([x for b in data.train_dataset(source, tokenizer, opts) for x in unpadded(b)])
    assert [len(shard) for shard in shards] == [334, 333, 333]
    assert collections.Counter(sum(shards, [])) == collections.Counter(tokenized)


def test_process_index_must_be_in_range(source, tokenizer):
    with pytest.raises(ValueError, match=r"process_index=3 is not in \[0, process_count=3\)"):
        data.train_dataset(source, tokenizer, options(process_index=3, process_count=3))


def test_default_process_is_jax_process(source, tokenizer):
    opts = options(process_index=None, process_count=None, seed=4)
    assert same(
        take(iter(data.train_dataset(source, tokenizer, opts)), 2),
        take(iter(data.train_dataset(source, tokenizer, options(seed=4))), 2),
    )


def test_eval_is_ordered_single_pass_and_padded(source, tokenizer, tokenized):
    ds = data.eval_dataset(source, tokenizer, batch_size=64, max_source_len=28, max_target_len=24)
    batches = list(ds)
    assert len(ds) == len(batches) == 16  # 1000 = 15 * 64 + 40
    assert set(batches[0]) == {"inputs", "targets", "decoder_inputs", "index"}
    index = np.concatenate([b["index"] for b in batches])
    assert np.array_equal(index, [*range(N), *[-1] * 24])
    rows = [row for b in batches for row in unpadded(b)]
    assert rows == tokenized
    last = batches[-1]
    assert not last["inputs"][40:].any() and not last["decoder_inputs"][40:].any()


@pytest.mark.parametrize("count", [1, 3, 7])
def test_eval_shards_cover_the_split_in_lockstep(source, tokenizer, tokenized, count):
    shards = [
        list(
            data.eval_dataset(
                source,
                tokenizer,
                batch_size=16,
                max_source_len=28,
                max_target_len=24,
                process_index=i,
                process_count=count,
            )
        )
        for i in range(count)
    ]
    assert len({len(shard) for shard in shards}) == 1  # the same number of steps everywhere
    index = np.concatenate([b["index"] for shard in shards for b in shard])
    assert sorted(index[index >= 0]) == list(range(N))
    for shard in shards:
        for batch in shard:
            for i, inputs, targets in zip(
                batch["index"], batch["inputs"], batch["targets"], strict=True
            ):
                if i >= 0:
                    assert (tuple(inputs[inputs != 0]), tuple(targets[targets != 0])) == tokenized[
                        i
                    ]
                else:
                    assert not inputs.any() and not targets.any()


def test_long_examples_are_dropped_counted_and_logged(source, tokenizer, tokenized, caplog):
    limit = 14
    fitting = [x for x in tokenized if len(x[0]) <= limit and len(x[1]) <= limit]
    assert 0 < len(fitting) < len(tokenized) - 2
    opts = options(pack=False, num_epochs=1, max_source_len=limit, max_target_len=limit)
    with caplog.at_level(logging.WARNING):
        found = [x for b in data.train_dataset(source, tokenizer, opts) for x in unpadded(b)]
    assert collections.Counter(found) == collections.Counter(fitting)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Dropped 1 of") for m in messages)
    assert any(m.startswith("Dropped 2 of") for m in messages)
    assert "longer than 14" in messages[0]


def test_truncation_keeps_every_example_and_its_eos(source, tokenizer, tokenized, caplog):
    opts = options(pack=True, num_epochs=1, max_source_len=10, max_target_len=6, truncate=True)
    with caplog.at_level(logging.WARNING):
        found = [x[:2] for b in data.train_dataset(source, tokenizer, opts) for x in unpack(b)]
    expected = [
        (s[:9] + (EOS,) if len(s) > 10 else s, t[:5] + (EOS,) if len(t) > 6 else t)
        for s, t in tokenized
    ]
    assert collections.Counter(found) == collections.Counter(expected)
    assert any(r.getMessage().startswith("Truncated 1 of") for r in caplog.records)


def test_eval_truncates_instead_of_dropping(source, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(
            data.eval_dataset(source, tokenizer, batch_size=N, max_source_len=8, max_target_len=5)
        )
    (batch,) = batches
    assert (batch["index"] == np.arange(N)).all()
    assert (batch["inputs"][:, -1] == EOS).any() and (batch["targets"] != 0).sum(1).max() == 5
    assert any("Truncated" in r.getMessage() for r in caplog.records)


def test_tfds_source_gives_the_same_batches_as_a_list(tmp_path, tokenizer):
    builder_dir = data.build_synthetic("de", str(tmp_path), seed=3, train_size=300, eval_size=2)
    tfds_source = data.prepare(builder_dir, source_lang="en", target_lang="de").source("train")
    as_list = [tfds_source[i] for i in range(len(tfds_source))]
    opts = options(batch_size=8)
    assert same(
        take(iter(data.train_dataset(tfds_source, tokenizer, opts)), 15),
        take(iter(data.train_dataset(as_list, tokenizer, opts)), 15),
    )
