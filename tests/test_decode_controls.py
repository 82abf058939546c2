"""Tests of the decoders' generation controls (min_length, no_repeat_ngram_size, beam search's
early_stopping) against NumPy step-by-step references and brute-force search."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax import beam_search, decode

PAD, BOS, EOS = 0, 1, 2
SPEC = decode.DecodeSpec(bos_id=BOS, eos_id=EOS, pad_id=PAD)


class PrevTokenModel:
    """A logits callback whose logits depend on the previous token, so greedy decoding cycles.

    logits(sentence b, prefix) = table[previous token] + pos_table[len(prefix)] + bias[b],
    with pad banned (-inf) and bos the previous token at step 0. The cache holds a per-sentence
    leaf bias [batch, vocab] and the step counter pos []. Calls are counted on the host.
    """

    def __init__(
        self,
        *,
        vocab: int,
        batch: int,
        max_len: int,
        seed: int,
        eos_shift: float = 0.0,
        eos_ramp: float = 0.0,
    ):
        rng = np.random.default_rng(seed)
        self.vocab, self.batch = vocab, batch
        self.table = (2.0 * rng.normal(size=(vocab, vocab))).astype(np.float32)
        self.table[:, PAD] = -np.inf
        self.table[:, EOS] += eos_shift
        self.pos_table = rng.normal(size=(max_len, vocab)).astype(np.float32)
        self.pos_table[:, EOS] += eos_ramp * np.arange(max_len)
        self.bias = rng.normal(size=(batch, vocab)).astype(np.float32)
        self.calls = 0

    def init_cache(self) -> dict:
        return {"bias": jnp.asarray(self.bias), "pos": jnp.zeros((), jnp.int32)}

    def _count(self) -> None:
        self.calls += 1

    def tokens_to_logits(self, ids: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        jax.debug.callback(self._count)
        beam = ids.shape[0] // self.batch
        bias = jnp.repeat(cache["bias"], beam, axis=0)  # [batch, vocab] -> [batch * beam, vocab]
        logits = jnp.asarray(self.table)[ids[:, 0]] + jnp.asarray(self.pos_table)[cache["pos"]]
        return logits + bias, {"bias": cache["bias"], "pos": cache["pos"] + 1}

    def ref_logits(self, sentence: int, prefix: tuple[int, ...]) -> np.ndarray:
        previous = prefix[-1] if prefix else BOS
        return self.table[previous] + self.pos_table[len(prefix)] + self.bias[sentence]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def ref_banned(prefix: tuple[int, ...], n: int) -> set[int]:
    """Hugging Face's n-gram table, by dictionary: tokens that would end a seen n-gram."""
    if n == 0:
        return set()
    seen = {tuple(prefix[j : j + n]) for j in range(len(prefix) - n + 1)}
    tail = tuple(prefix[len(prefix) - n + 1 :]) if n > 1 else ()
    return {gram[-1] for gram in seen if gram[:-1] == tail}


def ref_processed(model, sentence, prefix, min_length, n) -> np.ndarray:
    """[vocab] logits after the controls: eos banned before min_length, repeats banned."""
    logits = model.ref_logits(sentence, prefix).copy()
    if len(prefix) < min_length:
        logits[EOS] = -np.inf
    for token in ref_banned(prefix, n):
        logits[token] = -np.inf
    return logits


def ref_rows(model, max_len, min_length, n, choose):
    """Step-by-step NumPy greedy / sampling: choose(logits [batch, vocab], step) -> [batch]."""
    prefixes = [() for _ in range(model.batch)]
    ended = [False] * model.batch
    for step in range(max_len):
        if all(ended):
            break
        # Ended rows get placeholder logits: they only fill the batch the draw is made for.
        logits = np.stack(
            [
                np.zeros(model.vocab, np.float32)
                if ended[b]
                else ref_processed(model, b, prefixes[b], min_length, n)
                for b in range(model.batch)
            ]
        )
        chosen = choose(logits, step)
        for b in range(model.batch):
            if not ended[b]:
                prefixes[b] += (int(chosen[b]),)
                ended[b] = chosen[b] == EOS
    return prefixes


def ref_token_log_probs(model, sentence, seq, min_length, n) -> list[float]:
    """Log-probs of seq's tokens under the renormalised processed distributions."""
    return [
        log_softmax(ref_processed(model, sentence, seq[:i], min_length, n))[t]
        for i, t in enumerate(seq)
    ]


def assert_no_repeated_ngram(tokens: np.ndarray, length: int, n: int) -> None:
    """Brute force: every n-gram of tokens[:length] (eos included) occurs once."""
    grams = [tuple(tokens[j : j + n]) for j in range(length - n + 1)]
    assert len(grams) == len(set(grams)), (tokens[:length], n)


def assert_rows_equal_reference(model, out, prefixes, max_len, min_length, n):
    for b, prefix in enumerate(prefixes):
        expected = np.full(max_len, PAD)
        expected[: len(prefix)] = prefix
        np.testing.assert_array_equal(out.tokens[b], expected)
        assert out.lengths[b] == len(prefix)
        ref_lp = ref_token_log_probs(model, b, prefix, min_length, n)
        np.testing.assert_allclose(out.token_log_probs[b, : len(prefix)], ref_lp, atol=1e-5)
        np.testing.assert_allclose(out.score[b], sum(ref_lp), rtol=1e-5, atol=1e-5)


def jit_decoder(fn, model, *, min_length=0, n=0, **kwargs):
    spec = dataclasses.replace(SPEC, min_length=min_length, no_repeat_ngram_size=n)
    return jax.jit(functools.partial(fn, model.tokens_to_logits, spec=spec, **kwargs))


CONTROLS = [(0, 1), (0, 2), (0, 3), (4, 0), (3, 2), (2, 3)]  # (min_length, ngram size)
MAX_LEN = 12


@pytest.mark.parametrize("min_length, n", CONTROLS)
def test_greedy_equals_numpy_reference_with_controls(min_length, n):
    model = PrevTokenModel(vocab=8, batch=4, max_len=MAX_LEN, seed=0, eos_ramp=0.4)
    out = jax.device_get(
        jit_decoder(
            decode.greedy_search,
            model,
            min_length=min_length,
            n=n,
            batch_size=4,
            max_decode_len=MAX_LEN,
        )(model.init_cache())
    )
    argmax = lambda logits, step: logits.argmax(-1)  # noqa: E731
    prefixes = ref_rows(model, MAX_LEN, min_length, n, argmax)
    assert_rows_equal_reference(model, out, prefixes, MAX_LEN, min_length, n)
    for b in range(4):
        if n:
            assert_no_repeated_ngram(out.tokens[b], out.lengths[b], n)
        assert out.lengths[b] > min_length
    if n:
        # The ban matters here: unconstrained greedy decoding repeats n-grams.
        free = ref_rows(model, MAX_LEN, min_length, 0, argmax)
        assert any(
            len({p[j : j + n] for j in range(len(p) - n + 1)}) < len(p) - n + 1 for p in free
        )


@pytest.mark.parametrize("min_length, n", CONTROLS)
def test_sample_equals_numpy_reference_with_controls(min_length, n):
    model = PrevTokenModel(vocab=8, batch=6, max_len=MAX_LEN, seed=1, eos_ramp=0.4)
    rng = jax.random.key(5)
    run = jit_decoder(
        decode.sample, model, min_length=min_length, n=n, batch_size=6, max_decode_len=MAX_LEN
    )
    out = jax.device_get(run(model.init_cache(), rng))

    def choose(logits, step):
        return np.asarray(jax.random.categorical(jax.random.fold_in(rng, step), logits))

    prefixes = ref_rows(model, MAX_LEN, min_length, n, choose)
    assert_rows_equal_reference(model, out, prefixes, MAX_LEN, min_length, n)
    for b in range(6):
        if n:
            assert_no_repeated_ngram(out.tokens[b], out.lengths[b], n)
        assert out.lengths[b] > min_length


@pytest.mark.parametrize("n", [2, 3])
def test_beam_hypotheses_never_repeat_an_ngram(n):
    batch, beam = 3, 4
    model = PrevTokenModel(vocab=8, batch=batch, max_len=MAX_LEN, seed=3, eos_ramp=0.1)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        n=n,
        batch_size=batch,
        beam_size=beam,
        max_decode_len=MAX_LEN,
    )
    out = jax.device_get(run(model.init_cache()))
    assert np.all(np.isfinite(out.scores))
    for b, k in itertools.product(range(batch), range(beam)):
        seq = tuple(int(t) for t in out.tokens[b, k, : out.lengths[b, k]])
        assert_no_repeated_ngram(np.asarray(seq), len(seq), n)
        # Re-scored step by step: each token's record is of the banned, renormalised softmax.
        ref_lp = ref_token_log_probs(model, b, seq, 0, n)
        np.testing.assert_allclose(out.token_log_probs[b, k, : len(seq)], ref_lp, atol=1e-5)
    # Without the ban, the same search does repeat n-grams.
    free = jax.device_get(
        jit_decoder(
            beam_search.beam_search,
            model,
            batch_size=batch,
            beam_size=beam,
            max_decode_len=MAX_LEN,
        )(model.init_cache())
    )
    repeats = 0
    for b, k in itertools.product(range(batch), range(beam)):
        seq = free.tokens[b, k, : free.lengths[b, k]]
        repeats += len({tuple(seq[j : j + n]) for j in range(len(seq) - n + 1)}) < len(seq) - n + 1
    assert repeats > 0


@pytest.mark.parametrize("decoder", ["greedy", "sample", "beam"])
def test_min_length_delays_an_eager_eos_to_the_first_allowed_step(decoder):
    """eos is the model's first choice everywhere: every hypothesis ends at step min_length
    (length min_length + 1, eos counted), and its log-probs are of the renormalised softmax."""
    min_length, max_len, batch = 3, 8, 2
    model = PrevTokenModel(vocab=7, batch=batch, max_len=max_len, seed=3, eos_shift=40.0)
    fn = {"greedy": decode.greedy_search, "sample": decode.sample}.get(decoder)
    extra = {} if fn else dict(beam_size=3)
    rng = (jax.random.key(2),) if decoder == "sample" else ()
    run = jit_decoder(
        fn or beam_search.beam_search,
        model,
        min_length=min_length,
        batch_size=batch,
        max_decode_len=max_len,
        **extra,
    )
    out = jax.device_get(run(model.init_cache(), *rng))
    jax.effects_barrier()
    lengths = out.lengths.reshape(-1)  # [hypotheses]
    tokens = out.tokens.reshape(len(lengths), max_len)
    log_probs = out.token_log_probs.reshape(len(lengths), max_len)
    np.testing.assert_array_equal(lengths, min_length + 1)
    assert model.calls == min_length + 1  # no step after the forced ends
    for h in range(len(lengths)):
        sentence = h // (len(lengths) // batch)
        seq = tuple(int(t) for t in tokens[h, : min_length + 1])
        assert seq[-1] == EOS and EOS not in seq[:-1]
        ref_lp = ref_token_log_probs(model, sentence, seq, min_length, 0)
        np.testing.assert_allclose(log_probs[h, : min_length + 1], ref_lp, atol=1e-5)
        # Renormalised: the tokens before eos are likely once eos is banned, eos near-certain.
        assert ref_lp[-1] > -1e-6 and max(ref_lp[:-1]) > np.log(0.1)


def brute_force(model, sentence, max_len, min_length, n, alpha):
    """Every sequence the controls allow (eos-terminated, or max_len long), best first."""
    words = [v for v in range(model.vocab) if v not in (PAD, EOS)]
    seqs = [(*p, EOS) for k in range(max_len) for p in itertools.product(words, repeat=k)]
    seqs += list(itertools.product(words, repeat=max_len))
    scored = []
    for seq in seqs:
        lps = ref_token_log_probs(model, sentence, seq, min_length, n)
        if all(np.isfinite(lps)):
            total = sum(lps)
            scored.append((total / ((5 + len(seq)) / 6) ** alpha, total, seq))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("min_length, n", [(2, 2), (1, 3), (3, 1)])
def test_wide_beam_finds_brute_force_best_with_controls(min_length, n):
    # vocab {pad (banned), bos, eos, 3, 4}, 4 steps: 3 ** 4 + 40 = 121 sequences at most, so a
    # beam of 128 prunes nothing and its n-best is the best of all allowed sequences.
    batch, beam, max_len, alpha = 2, 128, 4, 0.6
    model = PrevTokenModel(vocab=5, batch=batch, max_len=max_len, seed=4)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        min_length=min_length,
        n=n,
        batch_size=batch,
        beam_size=beam,
        max_decode_len=max_len,
        alpha=alpha,
    )
    out = jax.device_get(run(model.init_cache()))
    for b in range(batch):
        expected = brute_force(model, b, max_len, min_length, n, alpha)
        assert len(expected) < 121  # the controls removed sequences
        assert np.sum(np.isfinite(out.scores[b])) == len(expected)
        for k, (score, total, seq) in enumerate(expected[:5]):
            np.testing.assert_array_equal(out.tokens[b, k, : len(seq)], seq)
            assert out.lengths[b, k] == len(seq)
            np.testing.assert_allclose(out.scores[b, k], score, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out.log_prob_sums[b, k], total, rtol=1e-5, atol=1e-5)


def ref_beam(model, sentence, beam, max_len, alpha, early_stopping, min_length=0, n=0):
    """NumPy beam search with beam_search's rules; returns (n-best, steps run).

    early_stopping=True stops once `beam` hypotheses have finished; "never" once the full
    pool's worst score >= the best score an alive extension could reach.
    """

    def penalised(total, length):
        return total / ((5 + length) / 6) ** alpha

    alive, finished = [(0.0, ())], []  # (log-prob sum, tokens); (score, sum, tokens)
    for step in range(max_len):
        candidates = []
        for total, prefix in alive:
            lps = log_softmax(ref_processed(model, sentence, prefix, min_length, n))
            candidates += [(total + lp, (*prefix, v)) for v, lp in enumerate(lps)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        ending = [seq[-1] == EOS or step == max_len - 1 for _, seq in candidates]
        for rank, (total, seq) in enumerate(candidates):
            if rank < beam and ending[rank] and total > -np.inf:
                finished.append((penalised(total, step + 1), total, seq))
        finished = sorted(finished, key=lambda f: -f[0])[:beam]
        alive = [c for c, end in zip(candidates, ending, strict=True) if not end][:beam]
        if step == max_len - 1 or len(finished) < beam:
            continue
        if early_stopping is True:
            return finished, step + 1
        best = max(total for total, _ in alive)
        if finished[-1][0] >= max(penalised(best, k) for k in (step + 2, max_len)):
            return finished, step + 1
    return finished, max_len


@pytest.mark.parametrize("min_length, n", [(0, 0), (2, 2)])
def test_early_stopping_true_stops_once_the_pool_is_full(min_length, n):
    batch, beam, max_len, alpha = 3, 3, 10, 0.6
    model = PrevTokenModel(vocab=9, batch=batch, max_len=max_len, seed=6, eos_ramp=0.5)
    results = {}
    for rule in (True, "never"):
        model.calls = 0
        run = jit_decoder(
            beam_search.beam_search,
            model,
            min_length=min_length,
            n=n,
            batch_size=batch,
            beam_size=beam,
            max_decode_len=max_len,
            alpha=alpha,
            early_stopping=rule,
        )
        out = jax.device_get(run(model.init_cache()))
        jax.effects_barrier()
        steps = []
        for b in range(batch):
            expected, ran = ref_beam(model, b, beam, max_len, alpha, rule, min_length, n)
            steps.append(ran)
            for k, (score, total, seq) in enumerate(expected):
                np.testing.assert_array_equal(out.tokens[b, k, : len(seq)], seq)
                np.testing.assert_allclose(out.scores[b, k], score, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(out.log_prob_sums[b, k], total, rtol=1e-5, atol=1e-5)
        # The model ran exactly until the last sentence stopped; stopped sentences' pools
        # stayed as they were while the others ran.
        assert model.calls == max(steps)
        results[rule] = (model.calls, out)
    assert results[True][0] < results["never"][0]
    assert not np.allclose(results[True][1].scores, results["never"][1].scores)


def test_early_stopping_never_is_the_default():
    batch, beam, max_len = 2, 3, 8
    model = PrevTokenModel(vocab=9, batch=batch, max_len=max_len, seed=7, eos_ramp=0.5)
    kwargs = dict(batch_size=batch, beam_size=beam, max_decode_len=max_len)
    default = jax.device_get(
        jit_decoder(beam_search.beam_search, model, **kwargs)(model.init_cache())
    )
    never = jax.device_get(
        jit_decoder(beam_search.beam_search, model, early_stopping="never", **kwargs)(
            model.init_cache()
        )
    )
    jax.tree.map(np.testing.assert_array_equal, default, never)


def test_bad_control_values_are_rejected():
    with pytest.raises(ValueError, match="min_length"):
        dataclasses.replace(SPEC, min_length=-1)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        dataclasses.replace(SPEC, no_repeat_ngram_size=2.0)
    model = PrevTokenModel(vocab=5, batch=1, max_len=3, seed=0)
    run = jit_decoder(
        beam_search.beam_search,
        model,
        batch_size=1,
        beam_size=2,
        max_decode_len=3,
        early_stopping=False,
    )
    with pytest.raises(ValueError, match="early_stopping"):
        run(model.init_cache())


def test_ngram_mask_by_hand():
    """Generated 3 4 3 4 3 (step 5): n=1 bans both; the tails 3 / 4 3 / 3 4 3 were each
    followed by 4 before; the tail 4 3 4 3 never was. Positions >= step are not read."""
    history = jnp.asarray([[3, 4, 3, 4, 3, 4, 4, 4]])
    mask = jax.jit(decode.repeated_ngram_mask, static_argnums=(2, 3))
    for n, banned in ((1, [3, 4]), (2, [4]), (3, [4]), (4, [4]), (5, [])):
        got = np.flatnonzero(np.asarray(mask(history, jnp.int32(5), n, 6))[0])
        np.testing.assert_array_equal(got, banned, err_msg=f"n={n}")
        assert sorted(ref_banned((3, 4, 3, 4, 3), n)) == banned
    # Only the most recent window matches: a run bans its own token once it is n - 1 long.
    for row, step, n, banned in (([3, 5, 5], 3, 2, [5]), ([3, 4, 4, 4], 4, 3, [4])):
        got = np.flatnonzero(np.asarray(mask(jnp.asarray([row + [0]]), jnp.int32(step), n, 6)))
        np.testing.assert_array_equal(got, banned, err_msg=f"{row}, n={n}")
        assert sorted(ref_banned(tuple(row[:step]), n)) == banned
