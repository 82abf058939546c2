"""Tests of tfjax.decode and tfjax.beam_search against no-cache NumPy references, toy callbacks."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax import beam_search, decode

PAD, BOS, EOS = 0, 2, 3
SPEC = decode.DecodeSpec(bos_id=BOS, eos_id=EOS, pad_id=PAD)


class ToyModel:
    """A logits callback whose next-token logits depend on the whole prefix.

    logits(sentence b, prefix) = table[hash(bos, prefix)] + pos_table[len(prefix)]
    + bias[b], with pad banned (-inf) as a real callback would ban it. The cache holds
    the three kinds of leaf the decoder's contract names:
      hist [rows, max_len] int32: tokens fed so far, per hypothesis (like self-attention k/v);
      bias [batch, vocab] float32: per sentence and different for each (like cross-attention
        k/v), so copying or mis-reordering it changes the results;
      pos  [] int32: the step counter (like Linen's cache_index).
    Calls are counted on the host as they run, so skipped steps are visible.
    """

    def __init__(
        self,
        *,
        vocab: int,
        batch: int,
        max_len: int,
        seed: int,
        eos_bias: tuple[float, ...] = (),
        eos_ramp: float = 0.0,
        force_eos_from: int | None = None,
        buckets: int = 61,
    ):
        rng = np.random.default_rng(seed)
        self.vocab, self.batch, self.max_len, self.buckets = vocab, batch, max_len, buckets
        self.table = (2.0 * rng.normal(size=(buckets, vocab))).astype(np.float32)
        self.table[:, PAD] = -np.inf
        self.pos_table = rng.normal(size=(max_len, vocab)).astype(np.float32)
        self.pos_table[:, EOS] += eos_ramp * np.arange(max_len)
        if force_eos_from is not None:
            self.pos_table[force_eos_from:, EOS] += 50.0
        self.weights = rng.integers(1, buckets, size=max_len).astype(np.int32)
        self.bias = rng.normal(size=(batch, vocab)).astype(np.float32)
        self.bias[: len(eos_bias), EOS] += np.asarray(eos_bias, np.float32)
        self.calls = 0
        self.traced_cache_shapes: list[dict] = []

    def init_cache(self, rows: int) -> dict:
        return {
            "hist": jnp.zeros((rows, self.max_len), jnp.int32),
            "bias": jnp.asarray(self.bias),
            "pos": jnp.zeros((), jnp.int32),
        }

    def _count(self) -> None:
        self.calls += 1

    def tokens_to_logits(self, ids: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        jax.debug.callback(self._count)
        self.traced_cache_shapes.append(jax.tree.map(jnp.shape, cache))
        rows, pos = ids.shape[0], cache["pos"]
        hist = cache["hist"].at[:, pos].set(ids[:, 0])  # [rows, max_len]
        buckets = (hist * jnp.asarray(self.weights)).sum(-1) % self.buckets  # [rows]
        beam = rows // cache["bias"].shape[0]
        bias = jnp.repeat(cache["bias"], beam, axis=0)  # [batch, vocab] -> [batch * beam, vocab]
        logits = jnp.asarray(self.table)[buckets] + jnp.asarray(self.pos_table)[pos] + bias
        return logits, {"hist": hist, "bias": cache["bias"], "pos": pos + 1}

    def ref_logits(self, sentence: int, prefix: tuple[int, ...]) -> np.ndarray:
        """[vocab] float32 logits after bos + prefix, recomputed from the whole prefix."""
        fed = (BOS, *prefix)
        bucket = int(np.dot(self.weights[: len(fed)], fed)) % self.buckets
        return self.table[bucket] + self.pos_table[len(prefix)] + self.bias[sentence]

    def ref_log_probs(self, sentence: int, prefix: tuple[int, ...]) -> np.ndarray:
        return log_softmax(self.ref_logits(sentence, prefix))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def penalised(log_prob_sum: float, length: int, alpha: float, style: str) -> float:
    divisor = ((5 + length) / 6) ** alpha if style == "gnmt" else length**alpha
    return log_prob_sum / divisor


def jit_decoder(fn, model: ToyModel, *, num_top: int = 0, processor=None, **kwargs):
    spec = dataclasses.replace(SPEC, num_top=num_top, logits_processor=processor)
    return jax.jit(functools.partial(fn, model.tokens_to_logits, spec=spec, **kwargs))


def assert_history(model, sentence, tokens, token_log_probs, top_ids, top_probs, length):
    """One hypothesis's per-step record equals re-scoring its tokens with the reference."""
    tokens = [int(t) for t in tokens]
    for i in range(len(tokens)):
        if i >= length:
            assert tokens[i] == PAD and token_log_probs[i] == 0
            assert np.all(top_ids[i] == PAD) and np.all(top_probs[i] == 0)
            continue
        log_probs = model.ref_log_probs(sentence, tuple(tokens[:i]))
        np.testing.assert_allclose(token_log_probs[i], log_probs[tokens[i]], rtol=1e-5, atol=1e-5)
        expected_ids = np.argsort(-log_probs, kind="stable")[: top_ids.shape[-1]]
        np.testing.assert_array_equal(top_ids[i], expected_ids)
        np.testing.assert_allclose(top_probs[i], np.exp(log_probs[expected_ids]), atol=1e-6)
    # A hypothesis ends at its first eos, or at max length without one.
    assert EOS not in tokens[: length - 1]
    assert tokens[length - 1] == EOS or length == len(tokens)


def ref_rows(model, max_len, choose):
    """No-cache reference for greedy / sampling: choose(logits [batch, vocab], step)."""
    prefixes = [() for _ in range(model.batch)]
    ended = [False] * model.batch
    for step in range(max_len):
        if all(ended):
            break
        logits = np.stack([model.ref_logits(b, prefixes[b]) for b in range(model.batch)])
        chosen = choose(logits, step)
        for b in range(model.batch):
            if not ended[b]:
                prefixes[b] += (int(chosen[b]),)
                ended[b] = chosen[b] == EOS
    return prefixes


def assert_rows_match(model, out, prefixes, max_len):
    """A DecodeOutput equals reference prefixes, with per-step records re-scored."""
    for b, prefix in enumerate(prefixes):
        expected = np.full(max_len, PAD)
        expected[: len(prefix)] = prefix
        np.testing.assert_array_equal(out.tokens[b], expected)
        assert out.lengths[b] == len(prefix)
        ref_sum = sum(model.ref_log_probs(b, prefix[:i])[t] for i, t in enumerate(prefix))
        np.testing.assert_allclose(out.score[b], ref_sum, rtol=1e-5)
        assert_history(
            model,
            b,
            out.tokens[b],
            out.token_log_probs[b],
            out.top_ids[b],
            out.top_probs[b],
            len(prefix),
        )


def np_filter(logits, temperature, top_k, top_p):
    """Definition-level reference: the k most probable, then the smallest set with mass >= p."""
    x = logits.astype(np.float32) / np.float32(temperature)
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")[: top_k or len(row)]
        probs = np.exp(log_softmax(row[order]))
        # The smallest n whose n most probable tokens hold mass >= top_p; top_p = 1 keeps all,
        # since a rounded total mass may fall just short of 1.
        size = len(order) if top_p == 1 else int(np.argmax(np.cumsum(probs) >= top_p)) + 1
        out[r, order[:size]] = row[order[:size]]
    return out


# Greedy and sampling.

GREEDY_LEN = 8


@pytest.fixture(scope="module")
def greedy_model():
    # Sentence 0 leans to eos, sentence 2 never ends; the others end where they end.
    return ToyModel(vocab=11, batch=4, max_len=GREEDY_LEN, seed=0, eos_bias=(2.0, 0.0, -50.0))


@pytest.fixture(scope="module")
def greedy_out(greedy_model):
    run = jit_decoder(
        decode.greedy_search, greedy_model, batch_size=4, max_decode_len=GREEDY_LEN, num_top=3
    )
    return jax.device_get(run(greedy_model.init_cache(4)))


def test_greedy_matches_no_cache_reference(greedy_model, greedy_out):
    prefixes = ref_rows(greedy_model, GREEDY_LEN, lambda logits, step: logits.argmax(-1))
    assert_rows_match(greedy_model, greedy_out, prefixes, GREEDY_LEN)
    assert len(set(greedy_out.lengths.tolist())) > 1 and GREEDY_LEN in greedy_out.lengths


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9), (1.5, 0, 0.6)])
def test_sample_matches_no_cache_reference(temperature, top_k, top_p):
    model = ToyModel(vocab=11, batch=6, max_len=7, seed=1)
    rng = jax.random.key(7)
    run = jit_decoder(
        decode.sample,
        model,
        batch_size=6,
        max_decode_len=7,
        num_top=2,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    out = jax.device_get(run(model.init_cache(6), rng))

    def choose(logits, step):
        filtered = np_filter(logits, temperature, top_k, top_p)
        return np.asarray(jax.random.categorical(jax.random.fold_in(rng, step), filtered))

    assert_rows_match(model, out, ref_rows(model, 7, choose), 7)


def test_top_k_one_and_cold_temperature_equal_greedy(greedy_model, greedy_out):
    kwargs = dict(batch_size=4, max_decode_len=GREEDY_LEN, num_top=3)
    for sampling in (dict(top_k=1, temperature=2.0), dict(temperature=1e-4)):
        run = jit_decoder(decode.sample, greedy_model, **kwargs, **sampling)
        out = jax.device_get(run(greedy_model.init_cache(4), jax.random.key(3)))
        for field in ("tokens", "lengths", "score", "token_log_probs", "top_ids", "top_probs"):
            np.testing.assert_array_equal(getattr(out, field), getattr(greedy_out, field))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 0.3), (1.0, 0, 0.9), (1.0, 0, 0.99), (0.5, 0, 0.8), (2.0, 5, 0.7), (1.0, 4, 1.0)],
)
def test_filter_logits_keeps_smallest_set_with_mass_p(temperature, top_k, top_p):
    logits = np.random.default_rng(2).normal(size=(32, 10)).astype(np.float32) * 2
    filter_fn = functools.partial(
        decode.filter_logits, temperature=temperature, top_k=top_k, top_p=top_p
    )
    got = np.asarray(jax.jit(filter_fn)(logits))
    np.testing.assert_array_equal(got, np_filter(logits, temperature, top_k, top_p))


def test_rows_end_with_pad_and_lengths():
    """Forced eos from step 2: lengths <= 3, pad and zeros after eos, and no model calls after."""
    model = ToyModel(vocab=11, batch=3, max_len=8, seed=4, force_eos_from=2, eos_bias=(4.0,))
    run = jit_decoder(decode.greedy_search, model, batch_size=3, max_decode_len=8, num_top=2)
    out = jax.device_get(run(model.init_cache(3)))
    jax.effects_barrier()
    for b in range(3):
        end = out.lengths[b]
        assert 1 <= end <= 3 and out.tokens[b, end - 1] == EOS
        assert np.all(out.tokens[b, end:] == PAD) and np.all(out.token_log_probs[b, end:] == 0)
        assert np.all(out.top_ids[b, end:] == PAD) and np.all(out.top_probs[b, end:] == 0)
    np.testing.assert_allclose(out.score, out.token_log_probs.sum(-1))
    assert model.calls == out.lengths.max() == 3


def test_greedy_skips_model_calls_after_every_row_ended():
    model = ToyModel(vocab=11, batch=4, max_len=12, seed=0, eos_bias=(3.0, 3.0, 3.0, 3.0))
    run = jit_decoder(decode.greedy_search, model, batch_size=4, max_decode_len=12)
    out = jax.device_get(run(model.init_cache(4)))
    jax.effects_barrier()
    assert model.calls == out.lengths.max() < 12
    assert out.top_ids.shape == out.top_probs.shape == (4, 12, 0)  # num_top=0 records none


def test_target_log_probs_equals_greedy_score(greedy_model, greedy_out):
    """Teacher-forced scoring of the greedy output gives back its per-token log-probs."""
    logits = np.zeros((4, GREEDY_LEN, greedy_model.vocab), np.float32)
    for b in range(4):
        for i in range(greedy_out.lengths[b]):
            logits[b, i] = greedy_model.ref_logits(b, tuple(greedy_out.tokens[b, :i]))
    got = jax.jit(functools.partial(decode.target_log_probs, pad_id=PAD))(logits, greedy_out.tokens)
    np.testing.assert_allclose(got, greedy_out.token_log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), greedy_out.score, rtol=1e-5)


# Beam search.


def ref_beam(model, sentence, beam, max_len, alpha, style, early_stop=True):
    """Straightforward beam search on the no-cache reference; returns (n-best, steps run).

    Same rules as beam_search.beam_search: the 2 * beam best extensions by raw sum; those among
    the best `beam` that end (eos or max_len) finish; the best `beam` others stay alive; stop
    (if early_stop) when the full pool's worst score >= the best score an alive extension
    could reach.
    """
    alive = [(0.0, ())]
    finished = []  # (score, log-prob sum, tokens)
    for step in range(max_len):
        candidates = []
        for total, prefix in alive:
            log_probs = model.ref_log_probs(sentence, prefix)
            candidates += [(total + lp, (*prefix, v)) for v, lp in enumerate(log_probs)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        ending = [seq[-1] == EOS or step == max_len - 1 for _, seq in candidates]
        for rank, (total, seq) in enumerate(candidates):
            if rank < beam and ending[rank] and total > -np.inf:
                finished.append((penalised(total, step + 1, alpha, style), total, seq))
        finished = sorted(finished, key=lambda f: -f[0])[:beam]
        alive = [c for c, end in zip(candidates, ending, strict=True) if not end][:beam]
        if not early_stop or step == max_len - 1 or len(finished) < beam:
            continue
        best = max(total for total, _ in alive)
        reach = max(penalised(best, n, alpha, style) for n in (step + 2, max_len))
        if finished[-1][0] >= reach:
            return finished, step + 1
    return finished, max_len


def assert_nbest_matches(model, out, sentence, expected):
    """n-best entries equal (score, log-prob sum, tokens) triples, with histories re-scored."""
    for k, (score, total, seq) in enumerate(expected):
        np.testing.assert_array_equal(out.tokens[sentence, k, : len(seq)], seq)
        assert out.lengths[sentence, k] == len(seq)
        np.testing.assert_allclose(out.scores[sentence, k], score, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.log_prob_sums[sentence, k], total, rtol=1e-5, atol=1e-5)
        assert_history(
            model,
            sentence,
            out.tokens[sentence, k],
            out.token_log_probs[sentence, k],
            out.top_ids[sentence, k],
            out.top_probs[sentence, k],
            len(seq),
        )
    assert np.all(out.scores[sentence, len(expected) :] == -np.inf)


@pytest.mark.parametrize(
    "alpha, style", [(0.6, "gnmt"), (0.0, "gnmt"), (1.0, "plain"), (-0.5, "plain")]
)
def test_beam_search_matches_numpy_reference(alpha, style):
    """n-best lists, scores, per-step histories after reordering, and the step count.

    Also checks the stopping rule is a true bound: running every step gives the same lists.
    """
    batch, beam, max_len = 3, 4, 8
    # eos grows likelier with position, so sentences stop early, each at its own step.
    model = ToyModel(vocab=9, batch=batch, max_len=max_len, seed=7, eos_ramp=1.0)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        batch_size=batch,
        beam_size=beam,
        max_decode_len=max_len,
        alpha=alpha,
        length_penalty=style,
        num_top=2,
    )
    out = jax.device_get(run(model.init_cache(batch * beam)))
    jax.effects_barrier()
    steps = []
    for b in range(batch):
        expected, ran = ref_beam(model, b, beam, max_len, alpha, style)
        assert expected == ref_beam(model, b, beam, max_len, alpha, style, early_stop=False)[0]
        assert_nbest_matches(model, out, b, expected)
        steps.append(ran)
    # Early stopping: the model ran exactly until the last sentence stopped.
    assert model.calls == max(steps) < max_len
    assert np.all(np.diff(out.scores, axis=1) <= 0)


def test_beam_search_keeps_per_sentence_leaf_uncopied():
    """The callback always sees bias [batch, vocab]; its values are pinned by the reference."""
    batch, beam = 2, 3
    model = ToyModel(vocab=9, batch=batch, max_len=5, seed=6)
    run = jit_decoder(
        beam_search.beam_search, model, batch_size=batch, beam_size=beam, max_decode_len=5
    )
    out = run(model.init_cache(batch * beam))
    assert out.top_ids.shape == out.top_probs.shape == (batch, beam, 5, 0)
    assert model.traced_cache_shapes
    for shapes in model.traced_cache_shapes:
        assert shapes == {"hist": (batch * beam, 5), "bias": (batch, 9), "pos": ()}


def test_reorder_cache_moves_only_per_hypothesis_leaves():
    batch, beam = 2, 3
    cache = {
        "rows": jnp.arange(batch * beam * 2).reshape(batch * beam, 2),
        "sentences": jnp.arange(batch * 4).reshape(batch, 4),
        "step": jnp.array(5),
    }
    parents = jnp.array([[2, 2, 0], [1, 0, 0]])
    got = jax.jit(beam_search.reorder_cache)(cache, parents)
    rows = [2, 2, 0, 3 + 1, 3 + 0, 3 + 0]  # row = b * beam + parent
    np.testing.assert_array_equal(got["rows"], np.asarray(cache["rows"])[rows])
    np.testing.assert_array_equal(got["sentences"], cache["sentences"])
    assert got["step"] == 5


def test_beam_size_one_equals_greedy(greedy_model, greedy_out):
    # With alpha = 0 and beam 1 the kept hypothesis is always the argmax extension.
    run = jit_decoder(
        beam_search.beam_search,
        greedy_model,
        batch_size=4,
        beam_size=1,
        max_decode_len=GREEDY_LEN,
        alpha=0.0,
        num_top=3,
    )
    out = jax.device_get(run(greedy_model.init_cache(4)))
    np.testing.assert_array_equal(out.tokens[:, 0], greedy_out.tokens)
    np.testing.assert_array_equal(out.lengths[:, 0], greedy_out.lengths)
    np.testing.assert_allclose(out.log_prob_sums[:, 0], greedy_out.score, rtol=1e-6)
    np.testing.assert_allclose(out.token_log_probs[:, 0], greedy_out.token_log_probs, rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids[:, 0], greedy_out.top_ids)
    np.testing.assert_allclose(out.top_probs[:, 0], greedy_out.top_probs, rtol=1e-6)


@pytest.mark.parametrize("alpha, style", [(0.6, "gnmt"), (1.0, "plain")])
def test_beam_search_scores_at_least_greedy(greedy_model, greedy_out, alpha, style):
    # Not a theorem for narrow beams (greedy's prefix can be pruned), but it holds for these
    # distributions, and a regression in ranking or penalties would break it.
    run = jit_decoder(
        beam_search.beam_search,
        greedy_model,
        batch_size=4,
        beam_size=4,
        max_decode_len=GREEDY_LEN,
        alpha=alpha,
        length_penalty=style,
    )
    out = jax.device_get(run(greedy_model.init_cache(16)))
    greedy = beam_search.penalised_score(
        greedy_out.score, greedy_out.lengths, alpha=alpha, length_penalty=style
    )
    assert np.all(out.scores[:, 0] >= greedy - 1e-5)
    assert np.any(out.scores[:, 0] > greedy + 1e-3)


def brute_force(model, sentence, max_len, alpha, style):
    """Every sequence (eos-terminated, or max_len long without eos), best first."""
    words = [v for v in range(model.vocab) if v not in (PAD, EOS)]
    seqs = [(*p, EOS) for n in range(max_len) for p in itertools.product(words, repeat=n)]
    seqs += list(itertools.product(words, repeat=max_len))
    scored = []
    for seq in seqs:
        total = sum(model.ref_log_probs(sentence, seq[:i])[t] for i, t in enumerate(seq))
        scored.append((penalised(total, len(seq), alpha, style), total, seq))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("alpha, style", [(0.6, "gnmt"), (2.0, "gnmt"), (1.0, "plain")])
def test_wide_beam_finds_brute_force_nbest(alpha, style):
    # vocab {pad (banned), 1, 2, eos, 4}, 3 steps: at most 9 * 4 = 36 finite candidates per
    # step, so beam 36 prunes nothing and its n-best is the best 36 of all 40 sequences.
    batch, beam, max_len = 2, 36, 3
    model = ToyModel(vocab=5, batch=batch, max_len=max_len, seed=8)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        batch_size=batch,
        beam_size=beam,
        max_decode_len=max_len,
        alpha=alpha,
        length_penalty=style,
    )
    out = jax.device_get(run(model.init_cache(batch * beam)))
    for b in range(batch):
        expected = brute_force(model, b, max_len, alpha, style)
        assert len(expected) == 40
        for k, (score, _, seq) in enumerate(expected[:beam]):
            np.testing.assert_array_equal(out.tokens[b, k, : len(seq)], seq)
            assert out.lengths[b, k] == len(seq)
            np.testing.assert_allclose(out.scores[b, k], score, rtol=1e-5, atol=1e-5)


def test_beam_search_stops_when_eos_is_forced():
    """All hypotheses end at step 2, so the search stops after 3 calls, padded after eos."""
    batch, beam, max_len = 2, 3, 8
    model = ToyModel(vocab=9, batch=batch, max_len=max_len, seed=9, force_eos_from=2)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        batch_size=batch,
        beam_size=beam,
        max_decode_len=max_len,
        num_top=2,
    )
    out = jax.device_get(run(model.init_cache(batch * beam)))
    jax.effects_barrier()
    assert model.calls == 3
    assert np.all(np.isfinite(out.scores)) and np.all(out.lengths <= 3)
    for b, k in itertools.product(range(batch), range(beam)):
        end = out.lengths[b, k]
        assert out.tokens[b, k, end - 1] == EOS and np.all(out.tokens[b, k, end:] == PAD)
        assert np.all(out.token_log_probs[b, k, end:] == 0)
        assert np.all(out.top_ids[b, k, end:] == PAD) and np.all(out.top_probs[b, k, end:] == 0)


@pytest.mark.parametrize("decoder", ["greedy", "sample", "beam"])
def test_decoders_apply_the_processor_at_each_step(decoder):
    """Token 1 banned, eos forced at step 3: every hypothesis obeys, and its records are of
    the processed distribution (the forced eos has log-prob 0, token 1 probability 0)."""
    model = ToyModel(vocab=9, batch=2, max_len=8, seed=10)
    processor = decode.chain(decode.ban_tokens([1]), decode.force_eos_at_end(EOS, 4))
    fn = {"greedy": decode.greedy_search, "sample": decode.sample}.get(decoder)
    beam = {} if fn else dict(beam_size=3)
    rng = (jax.random.key(1),) if decoder == "sample" else ()
    run = jit_decoder(
        fn or beam_search.beam_search,
        model,
        batch_size=2,
        max_decode_len=8,
        num_top=9,
        processor=processor,
        **beam,
    )
    out = jax.device_get(run(model.init_cache(6 if beam else 2), *rng))
    lengths = out.lengths.reshape(-1)  # [hypotheses]
    tokens = out.tokens.reshape(len(lengths), -1)  # [hypotheses, 8]
    assert np.all((1 <= lengths) & (lengths <= 4)) and np.any(lengths == 4)
    assert np.all(tokens[np.arange(len(lengths)), lengths - 1] == EOS) and 1 not in tokens
    forced = out.token_log_probs.reshape(len(lengths), -1)[lengths == 4, 3]
    np.testing.assert_array_equal(forced, 0.0)
    banned = np.where(out.top_ids == 1, out.top_probs, 0.0)
    np.testing.assert_array_equal(banned, 0.0)


def test_penalised_score_styles():
    sums, lengths = jnp.array([-6.0, -6.0]), jnp.array([1, 7])
    np.testing.assert_allclose(
        beam_search.penalised_score(sums, lengths, alpha=1.0, length_penalty="gnmt"), [-6.0, -3.0]
    )
    np.testing.assert_allclose(
        beam_search.penalised_score(sums, lengths, alpha=1.0, length_penalty="plain"),
        [-6.0, -6 / 7],
    )
    np.testing.assert_allclose(
        beam_search.penalised_score(sums, lengths, alpha=0.0, length_penalty="gnmt"), [-6.0, -6.0]
    )
    with pytest.raises(ValueError, match="'fairseq'"):
        beam_search.penalised_score(sums, lengths, alpha=1.0, length_penalty="fairseq")


@pytest.mark.parametrize("kind", ["normal", "ties", "minus_inf"])
@pytest.mark.parametrize(("shape", "k"), [((4, 3000), 8), ((3, 300), 4), ((2, 130), 3)])
def test_top_k_blocked_equals_lax_top_k(kind, shape, k):
    """Values, indices and tie order (lower index first) of the full top-k."""
    rng = np.random.default_rng(k)
    if kind == "ties":  # few distinct values: many ties, across and inside blocks
        x = rng.integers(0, 5, size=shape).astype(np.float32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    if kind == "minus_inf":  # finished beams' candidates; fewer finite values than blocks
        x[:, 2:] = -np.inf
    values, indices = jax.jit(decode.top_k_blocked, static_argnums=1)(jnp.asarray(x), k)
    order = np.lexsort((np.arange(shape[1])[None].repeat(shape[0], 0), -x), axis=1)[:, :k]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(values, np.take_along_axis(x, order, 1))


@pytest.mark.parametrize("kind", ["normal", "ties", "minus_inf", "nan"])
def test_argmax_equals_numpy_argmax(kind):
    """The first index of the largest value; a row with NaN picks its first NaN, as
    np.argmax and jnp.argmax do; over leading axes too."""
    rng = np.random.default_rng(len(kind))
    x = rng.normal(size=(3, 5, 300)).astype(np.float32)
    if kind == "ties":  # few distinct values: the largest repeats in every row
        x = rng.integers(0, 4, size=x.shape).astype(np.float32)
    if kind == "minus_inf":
        x[0, :, :] = -np.inf  # every entry -inf: index 0
        x[1, :, 7:] = -np.inf
    if kind == "nan":
        x[0, :, [40, 9]] = np.nan  # the first NaN wins, not the first written
        x[1, 2, -1] = np.nan
    got = jax.jit(decode.argmax)(jnp.asarray(x))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
