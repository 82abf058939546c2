"""tfjax.generate on real models: cached decoding equals full-forward references and HF generate.

References re-run the whole teacher-forced forward pass on each chosen prefix, with no cache;
the prefix is padded to MAX_LEN, which the causal mask makes invisible to the positions read.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from transformers import MarianConfig, MarianMTModel

from tfjax import continuous, decode
from tfjax import generate as G
from tfjax.interop import from_marian
from tfjax.model import Transformer, preset

VOCAB, PAD, EOS, BOS = 32, 0, 1, 2
BATCH, SOURCE_LEN, MAX_LEN, NUM_TOP = 5, 7, 10, 3
# Close enough for float32 paths that differ only in summation order (measured: ~2e-6).
ATOL = 2e-5
SEED, EOS_BIAS = 4, 2.0  # picked by a sweep for varied greedy lengths


def draw_params(model: Transformer, rng: np.random.Generator) -> dict:
    """Parameters drawn in NumPy: kernels, embeddings ~ N(0, 1 / d_model), LayerNorms identity.

    Compiling `model.init` takes about 8 s on CPU, a tenth of this module's budget.
    Randomly initialised decoders also tend to repeat one token forever, as the token fed in
    dominates the residual stream: large learned positions and a sharp output make the next
    token depend on the step, and an eos bias ends some rows early and others not at all.
    """
    dummy = jnp.ones((1, SOURCE_LEN), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)["params"])
    d_model = model.config.d_model

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        std = {"position_embedding": 2.0, "logits_kernel": 2.0 / d_model**0.5}
        return jnp.asarray(rng.normal(size=leaf.shape) * std.get(name, d_model**-0.5), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["decoder"]["logits_bias"] = jnp.zeros(VOCAB).at[EOS].set(EOS_BIAS)
    return params


@pytest.fixture(scope="module")
def tiny():
    """A tiny model whose greedy rows end at varied lengths, and a padded source batch."""
    model = Transformer(
        preset("tiny", vocab_size=VOCAB, tie_output=False, output_bias=True, positions="learned")
    )
    rng = np.random.default_rng(SEED)
    params = draw_params(model, rng)
    inputs = rng.integers(3, VOCAB, size=(BATCH, SOURCE_LEN))
    inputs[1, 4:] = PAD
    inputs[3, 2:] = PAD
    forward = jax.jit(lambda src, dec: model.apply({"params": params}, src, dec))
    return model, params, jnp.asarray(inputs, jnp.int32), forward


SPEC = decode.DecodeSpec(bos_id=BOS, eos_id=EOS, pad_id=PAD)
TOP = dataclasses.replace(SPEC, num_top=NUM_TOP)
KW = dict(max_decode_len=MAX_LEN)


@pytest.fixture(scope="module")
def greedy_out(tiny):
    model, params, inputs, _ = tiny
    return jax.device_get(G.translate_greedy(model, params, inputs, TOP, **KW))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_logits(tiny, sentences, prefixes, rows=None) -> np.ndarray:
    """[len(prefixes), V] float32 logits after bos + prefix, from the full forward pass.

    Sentence `sentences[i]` of the source batch goes with `prefixes[i]`; `rows` pads the
    batch to a fixed size so the forward pass compiles once.
    """
    _, _, inputs, forward = tiny
    rows = rows or len(prefixes)
    dec = np.full((rows, MAX_LEN), PAD, np.int32)
    src = np.zeros((rows, SOURCE_LEN), np.int32)
    for i, (b, prefix) in enumerate(zip(sentences, prefixes, strict=True)):
        dec[i, : len(prefix) + 1] = (BOS, *prefix)
        src[i] = inputs[b]
    logits = np.asarray(forward(jnp.asarray(src), jnp.asarray(dec)))  # [rows, MAX_LEN, V]
    return np.stack([logits[i, len(p)] for i, p in enumerate(prefixes)])


def ref_rows(tiny, choose, processor=None):
    """No-cache greedy / sampling: choose(logits [B, V], step) -> [B] token ids."""
    prefixes, ended = [() for _ in range(BATCH)], [False] * BATCH
    for step in range(MAX_LEN):
        if all(ended):
            break
        logits = next_logits(tiny, range(BATCH), prefixes)
        if processor is not None:
            logits = processor(logits, step)
        chosen = choose(logits, step)
        for b in range(BATCH):
            if not ended[b]:
                prefixes[b] += (int(chosen[b]),)
                ended[b] = chosen[b] == EOS
    return prefixes


def assert_histories(tiny, sentences, tokens, token_log_probs, top_ids, top_probs, processor=None):
    """Each step's token log-prob and top alternatives equal the full-forward softmax.

    Rows are hypotheses of `sentences` [R]: tokens, token_log_probs [R, MAX_LEN], top_ids,
    top_probs [R, MAX_LEN, NUM_TOP]. One teacher-forced pass over bos + tokens re-scores them
    all; by causality (pinned in test_model.py) position i sees only the prefix tokens[:i].
    """
    _, _, inputs, forward = tiny
    dec = np.concatenate([np.full((len(tokens), 1), BOS), tokens[:, :-1]], axis=1)
    logits = np.asarray(forward(inputs[np.asarray(sentences)], jnp.asarray(dec, jnp.int32)))
    if processor is not None:
        logits = np.stack([processor(logits[:, i], i) for i in range(MAX_LEN)], axis=1)
    log_probs = log_softmax(logits)  # [R, MAX_LEN, V]
    is_eos = tokens == EOS
    lengths = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, MAX_LEN)  # [R]
    live = np.arange(MAX_LEN) < lengths[:, None]  # [R, MAX_LEN]
    picked = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_log_probs, np.where(live, picked, 0), atol=ATOL)
    expected_ids = np.argsort(-log_probs, axis=-1, kind="stable")[..., : top_ids.shape[-1]]
    expected_probs = np.exp(np.take_along_axis(log_probs, expected_ids, -1))
    np.testing.assert_array_equal(top_ids, np.where(live[..., None], expected_ids, PAD))
    np.testing.assert_allclose(top_probs, np.where(live[..., None], expected_probs, 0), atol=ATOL)
    assert np.all(tokens[~live] == PAD)


def assert_rows_match(tiny, out, prefixes, processor=None):
    """A DecodeOutput equals the reference prefixes, with per-step records re-scored."""
    expected = np.full((BATCH, MAX_LEN), PAD)
    for b, prefix in enumerate(prefixes):
        expected[b, : len(prefix)] = prefix
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [len(p) for p in prefixes])
    records = (out.tokens, out.token_log_probs, out.top_ids, out.top_probs)
    assert_histories(tiny, np.arange(BATCH), *records, processor=processor)
    np.testing.assert_allclose(out.score, out.token_log_probs.sum(-1), rtol=1e-6)


def test_greedy_matches_full_forward(tiny, greedy_out):
    prefixes = ref_rows(tiny, lambda logits, step: logits.argmax(-1))
    assert_rows_match(tiny, greedy_out, prefixes)
    # Rows end at several lengths, and at least one runs to MAX_LEN without eos.
    assert len(set(greedy_out.lengths.tolist())) >= 3 and MAX_LEN in greedy_out.lengths


def test_continuous_decoding_equals_greedy_whatever_joins_when(tiny, greedy_out):
    # 15 sentences (the batch three times) join 4 rows one per call, so rows are refilled,
    # grown and shrunk, and the ring of MAX_LEN slots wraps several times; sentences 1 and 3
    # arrive cut to their unpadded length, so their fresh rows are padded to the batch's S.
    # Every row's tokens and records equal the whole-batch greedy decoder's (itself pinned
    # to the full forward pass above); a row with limit 3 is its first 3 tokens.
    model, params, inputs, _ = tiny
    inputs = np.asarray(inputs)

    def start(sentences):
        rows = continuous.bucket(len(sentences), 4)
        batch = np.full((rows, max(len(x) for x in sentences)), PAD, np.int32)
        for i, x in enumerate(sentences):
            batch[i, : len(x)] = x
        return G.rolling_rows(model, params, batch, max_decode_len=MAX_LEN, source_len=SOURCE_LEN)

    def step(cache, last, positions, num_top, num_steps):
        spec = dataclasses.replace(SPEC, num_top=num_top)
        return G.rolling_steps(model, params, cache, last, positions, spec, num_steps)

    decoder = continuous.ContinuousDecoder(
        start, step, max_rows=4, max_decode_len=MAX_LEN, bos_id=BOS, eos_id=EOS,
        max_steps_per_call=4,
    )  # fmt: skip
    cut = {1: 4, 3: 2}
    outputs, sizes = {}, set()
    for k in range(3 * BATCH):
        b = k % BATCH
        limit = 3 if k == 7 else MAX_LEN
        decoder.add(inputs[b, : cut.get(b, SOURCE_LEN)], k, limit=limit, num_top=NUM_TOP * (k % 2))
        outputs.update(decoder.step())
        sizes.add(len(decoder._rows))
    while decoder.running:
        outputs.update(decoder.step())
        sizes.add(len(decoder._rows))
    assert decoder.steps > 2 * MAX_LEN and sizes >= {1, 4}
    for k in range(3 * BATCH):
        b, out = k % BATCH, outputs[k]
        n = min(int(greedy_out.lengths[b]), 3 if k == 7 else MAX_LEN)
        assert int(out.lengths[0]) == n
        np.testing.assert_array_equal(out.tokens[0], greedy_out.tokens[b, :n])
        np.testing.assert_allclose(
            out.token_log_probs[0], greedy_out.token_log_probs[b, :n], atol=ATOL
        )
        top = NUM_TOP * (k % 2)
        np.testing.assert_array_equal(out.top_ids[0], greedy_out.top_ids[b, :n, :top])
        np.testing.assert_allclose(out.top_probs[0], greedy_out.top_probs[b, :n, :top], atol=ATOL)


def test_sample_matches_full_forward(tiny, greedy_out):
    """The draw of step t is categorical(fold_in(rng, t)) over the filtered logits.

    decode.filter_logits is pinned against NumPy in test_decode.py; here it is applied to the
    full-forward logits, so the test pins the cache and the callback, not the filtering.
    """
    model, params, inputs, _ = tiny
    rng = jax.random.key(7)
    sampling = dict(temperature=0.8, top_k=5, top_p=0.9)
    out = G.translate_sample(model, params, inputs, rng, TOP, **sampling, **KW)

    def choose(logits, step):
        filtered = decode.filter_logits(jnp.asarray(logits), **sampling)
        return np.asarray(jax.random.categorical(jax.random.fold_in(rng, step), filtered))

    out = jax.device_get(out)
    assert_rows_match(tiny, out, ref_rows(tiny, choose))
    assert np.any(out.tokens != greedy_out.tokens)  # the draws are not all the argmax


def np_ban_and_force(logits: np.ndarray, step: int) -> np.ndarray:
    """NumPy twin of BAN_AND_FORCE: pad and token 5 banned, eos forced at the last step."""
    logits = np.array(logits, np.float32)
    logits[:, [PAD, 5]] = -np.inf
    if step == MAX_LEN - 1:
        logits[:] = -np.inf
        logits[:, EOS] = 0.0
    return logits


BAN_AND_FORCE = decode.chain(decode.ban_tokens([PAD, 5]), decode.force_eos_at_end(EOS, MAX_LEN))


def test_logits_processor_sees_each_step(tiny):
    """Greedy and score with a processor equal the reference with its NumPy twin."""
    model, params, inputs, _ = tiny
    spec = dataclasses.replace(TOP, logits_processor=BAN_AND_FORCE)
    out = jax.device_get(G.translate_greedy(model, params, inputs, spec, **KW))
    prefixes = ref_rows(tiny, lambda logits, step: logits.argmax(-1), np_ban_and_force)
    assert_rows_match(tiny, out, prefixes, np_ban_and_force)
    # Forced eos: every row ends by MAX_LEN, and the banned tokens never appear.
    assert np.all(out.tokens[np.arange(BATCH), out.lengths - 1] == EOS)
    assert 5 not in out.tokens[out.tokens != PAD]
    scored = G.score(model, params, inputs, out.tokens, spec)
    np.testing.assert_allclose(scored, out.token_log_probs, atol=ATOL)


@pytest.mark.parametrize("beam", [1, 3])
def test_score_applies_the_specs_controls_as_the_decoders_do(tiny, beam):
    """With min_length and no_repeat_ngram_size set, scoring a decoder's output with its own
    spec gives back its token log-probabilities (of the banned, renormalised distribution)."""
    model, params, inputs, _ = tiny
    spec = dataclasses.replace(
        TOP, logits_processor=BAN_AND_FORCE, min_length=3, no_repeat_ngram_size=2
    )
    if beam == 1:
        out = jax.device_get(G.translate_greedy(model, params, inputs, spec, **KW))
    else:
        best = G.translate_beam(model, params, inputs, spec, beam_size=beam, **KW)
        out = jax.device_get(jax.tree_util.tree_map(lambda x: x[:, 0], best))
    assert np.all(out.lengths >= 4)  # min_length 3, then eos
    scored = G.score(model, params, inputs, out.tokens, spec)
    plain = G.score(
        model, params, inputs, out.tokens, dataclasses.replace(TOP, logits_processor=BAN_AND_FORCE)
    )
    np.testing.assert_allclose(scored, out.token_log_probs, atol=ATOL)
    assert not np.allclose(plain, out.token_log_probs, atol=ATOL)  # the controls do matter


def test_score_equals_full_forward_prefix_by_prefix(tiny):
    model, params, inputs, _ = tiny
    rng = np.random.default_rng(3)
    targets = rng.integers(3, VOCAB, size=(BATCH, MAX_LEN))
    for b, length in enumerate([1, 4, MAX_LEN, 7, 2]):
        if length < MAX_LEN:  # row 2 runs to MAX_LEN without eos
            targets[b, length - 1] = EOS
            targets[b, length:] = PAD
    got = np.asarray(G.score(model, params, inputs, jnp.asarray(targets), SPEC))
    expected = np.zeros((BATCH, MAX_LEN))
    for t in range(MAX_LEN):
        log_probs = log_softmax(next_logits(tiny, range(BATCH), [tuple(r[:t]) for r in targets]))
        expected[:, t] = np.where(
            targets[:, t] != PAD, log_probs[np.arange(BATCH), targets[:, t]], 0
        )
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(got.sum(-1), expected.sum(-1), atol=ATOL)


def test_score_gives_back_greedy_log_probs(tiny, greedy_out):
    """Equal wherever the token is not pad_id, which `score` takes for padding and scores 0.

    Greedy does not ban pad unless told to, and this model emits it mid-sentence (row 1),
    so that row's score is short by exactly that token's log-prob.
    """
    model, params, inputs, _ = tiny
    tokens = greedy_out.tokens
    got = np.asarray(G.score(model, params, inputs, jnp.asarray(tokens), SPEC))
    inside = np.arange(MAX_LEN) < greedy_out.lengths[:, None]
    assert np.any(inside & (tokens == PAD))  # the case the docstring describes does occur
    expected = np.where(tokens == PAD, 0.0, greedy_out.token_log_probs)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(got.sum(-1), expected.sum(-1), atol=ATOL)


def penalised(log_prob_sum: float, length: int, alpha: float, style: str) -> float:
    divisor = ((5 + length) / 6) ** alpha if style == "gnmt" else length**alpha
    return log_prob_sum / divisor


def ref_beam(tiny, beam, alpha, style):
    """Beam search over full-forward log-probs, every sentence in lockstep, all MAX_LEN steps.

    Same rules as beam_search.beam_search: the 2 * beam best extensions by raw sum; those among the
    best `beam` that end (eos or MAX_LEN) finish, scored with the penalty; the best `beam`
    others stay alive. No early stopping, which beam_search.beam_search says never changes the
    n-best. Returns per sentence a list of (score, log-prob sum, tokens), best first.
    """
    alive = [[(0.0, ())] for _ in range(BATCH)]
    finished = [[] for _ in range(BATCH)]
    for step in range(MAX_LEN):
        rows = [(b, prefix) for b in range(BATCH) for _, prefix in alive[b]]
        logits = next_logits(tiny, *zip(*rows, strict=True), rows=BATCH * beam)
        log_probs = iter(log_softmax(logits))
        for b in range(BATCH):
            candidates = []
            for total, prefix in alive[b]:
                lp = next(log_probs)
                candidates += [(total + lp[v], (*prefix, v)) for v in range(VOCAB)]
            candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
            ending = [seq[-1] == EOS or step == MAX_LEN - 1 for _, seq in candidates]
            for rank, (total, seq) in enumerate(candidates[:beam]):
                if ending[rank]:
                    finished[b].append((penalised(total, step + 1, alpha, style), total, seq))
            finished[b] = sorted(finished[b], key=lambda f: -f[0])[:beam]
            alive[b] = [c for c, end in zip(candidates, ending, strict=True) if not end][:beam]
    return finished


def test_beam_matches_full_forward_beam_search(tiny, greedy_out):
    """n-best lists, scores and per-step records; "plain" penalties are pinned against HF below."""
    model, params, inputs, _ = tiny
    beam, alpha, style = 4, 0.6, "gnmt"
    out = G.translate_beam(
        model,
        params,
        inputs,
        TOP,
        beam_size=beam,
        alpha=alpha,
        length_penalty=style,
        **KW,
    )
    out = jax.device_get(out)
    for b, nbest in enumerate(ref_beam(tiny, beam, alpha, style)):
        assert len(nbest) == beam
        for k, (score, total, seq) in enumerate(nbest):
            np.testing.assert_array_equal(out.tokens[b, k, : len(seq)], seq)
            assert out.lengths[b, k] == len(seq)
            np.testing.assert_allclose(out.scores[b, k], score, atol=ATOL)
            np.testing.assert_allclose(out.log_prob_sums[b, k], total, atol=ATOL)
    records = (out.tokens, out.token_log_probs, out.top_ids, out.top_probs)
    # [B, beam, ...] -> [B * beam, ...]
    flat = [r.reshape(BATCH * beam, *r.shape[2:]) for r in records]
    assert_histories(tiny, np.repeat(np.arange(BATCH), beam), *flat)
    greedy = penalised(greedy_out.score, greedy_out.lengths, alpha, style)
    assert np.all(out.scores[:, 0] >= greedy - ATOL)
    assert np.any(out.scores[:, 0] > greedy + 1e-3)  # the beam finds something greedy missed


def test_beam_size_one_equals_greedy(tiny, greedy_out):
    model, params, inputs, _ = tiny
    out = G.translate_beam(model, params, inputs, TOP, beam_size=1, alpha=0.0, **KW)
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens[:, 0], greedy_out.tokens)
    np.testing.assert_array_equal(out.lengths[:, 0], greedy_out.lengths)
    np.testing.assert_array_equal(out.top_ids[:, 0], greedy_out.top_ids)
    np.testing.assert_allclose(out.token_log_probs[:, 0], greedy_out.token_log_probs, atol=1e-6)
    np.testing.assert_allclose(out.log_prob_sums[:, 0], greedy_out.score, atol=1e-6)
    np.testing.assert_allclose(out.top_probs[:, 0], greedy_out.top_probs, atol=1e-6)


# Hugging Face parity.

HF_VOCAB, HF_PAD, HF_EOS, HF_BATCH, HF_LEN = 40, 39, 0, 8, 12


@pytest.fixture(scope="module")
def marian():
    """A random MarianMTModel, its tfjax conversion, and a padded source batch.

    Hugging Face's initialisation (std 0.02) gives near-uniform logits that the logits bias
    decides alone, so every row repeats one token. Re-drawn weights, small token embeddings
    (so positions move the decoder), a separate output matrix with a louder eos row, and an
    eos bias give rows that vary and end at several lengths, some only at HF_LEN. Seed and
    scales were picked by a sweep for that spread.

    Encoder and decoder embeddings are separate tables: in transformers 5 an untied output
    (tie_word_embeddings=False) also unties both embed_tokens from `model.shared`, the one
    table from_marian reads when the config shares embeddings.
    """
    torch.manual_seed(5)
    config = MarianConfig(
        vocab_size=HF_VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=HF_PAD, decoder_start_token_id=HF_PAD, eos_token_id=HF_EOS,
        activation_function="swish", scale_embedding=True, tie_word_embeddings=False,
        share_encoder_decoder_embeddings=False, decoder_vocab_size=HF_VOCAB,
    )  # fmt: skip
    hf = MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim != 2 or "embed_positions" in name:  # positions stay sinusoidal
                continue
            if "embed_tokens" in name:  # [V, D]; sqrt(D) scaling brings them to std 0.1
                p.normal_(0, 0.1 / p.shape[1] ** 0.5)
            else:  # [out, in]
                p.normal_(0, (2.5 if name == "lm_head.weight" else 1.0) / p.shape[1] ** 0.5)
        hf.lm_head.weight[HF_EOS] *= 3
        hf.final_logits_bias.normal_(0, 0.5)
        hf.final_logits_bias[0, HF_EOS] += 1.0
    converted = from_marian(hf)
    assert (converted.bos_id, converted.eos_id, converted.pad_id) == (HF_PAD, HF_EOS, HF_PAD)
    rng = np.random.default_rng(0)
    src = rng.integers(1, HF_PAD, size=(HF_BATCH, 9))
    for row, length in ((1, 5), (3, 2), (6, 4)):
        src[row, length:] = HF_PAD
    model = Transformer(converted.config)
    params = jax.tree.map(jnp.asarray, converted.params)
    return hf, model, params, src


def hf_generate(hf, src, **kwargs):
    """Hugging Face generate with every processing option named; kwargs override."""
    options = dict(
        max_new_tokens=HF_LEN,
        do_sample=False,
        num_beams=1,
        bad_words_ids=None,
        forced_eos_token_id=None,
        min_length=0,
        no_repeat_ngram_size=0,
        repetition_penalty=1.0,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=HF_PAD,
        eos_token_id=HF_EOS,
        decoder_start_token_id=HF_PAD,
    )
    with torch.no_grad():
        return hf.generate(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src != HF_PAD),
            **{**options, **kwargs},
        )


def assert_same_tokens(ours: np.ndarray, theirs: torch.Tensor) -> None:
    """ours [rows, HF_LEN] vs HF sequences [rows, 1 + n]: HF starts with decoder_start and is
    cut after its longest row, where ours keeps padding to HF_LEN."""
    theirs = theirs.numpy()[:, 1:]
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert np.all(ours[:, theirs.shape[1] :] == HF_PAD)


HF_SPEC = decode.DecodeSpec(bos_id=HF_PAD, eos_id=HF_EOS, pad_id=HF_PAD)


def test_greedy_matches_hugging_face_marian(marian):
    """Marian's own generation rules: pad banned (bad_words_ids), eos forced at the last step.

    Both are applied to logits in Hugging Face greedy search, so the hook reproduces them
    exactly; HF `scores` are those processed logits, whose log-softmax is our token log-prob.
    """
    hf, model, params, src = marian
    processor = decode.chain(decode.ban_tokens([HF_PAD]), decode.force_eos_at_end(HF_EOS, HF_LEN))
    theirs = hf_generate(hf, src, bad_words_ids=[[HF_PAD]], forced_eos_token_id=HF_EOS)
    spec = dataclasses.replace(HF_SPEC, logits_processor=processor)
    out = G.translate_greedy(model, params, jnp.asarray(src), spec, max_decode_len=HF_LEN)
    out = jax.device_get(out)
    assert_same_tokens(out.tokens, theirs.sequences)
    lengths = out.lengths.tolist()
    assert len(set(lengths)) >= 4 and HF_LEN in lengths, lengths
    log_probs = torch.log_softmax(torch.stack(theirs.scores, dim=1), -1).numpy()  # [B, n, V]
    steps = log_probs.shape[1]
    picked = np.take_along_axis(log_probs, out.tokens[:, :steps, None], -1)[..., 0]
    picked = np.where(np.arange(steps) < out.lengths[:, None], picked, 0.0)
    np.testing.assert_allclose(out.token_log_probs[:, :steps], picked, atol=1e-4)


@pytest.mark.parametrize("alpha, force_eos", [(1.0, False), (0.6, True)])
def test_beam_search_matches_hugging_face_marian(marian, alpha, force_eos):
    """The whole 4-best list and its scores equal HF's `num_return_sequences=4`.

    early_stopping="never" makes HF stop on a true bound, as beam_search.beam_search does. Pad is
    not banned: HF beam search bans on log-probabilities without renormalising, which a
    logits hook cannot reproduce, so its scores would differ by log(1 - p(pad)) per step.
    Forcing eos at the last step is exact either way: HF gives eos log-prob 0, as we do.
    """
    hf, model, params, src = marian
    beam = 4
    processor = decode.force_eos_at_end(HF_EOS, HF_LEN) if force_eos else None
    theirs = hf_generate(
        hf,
        src,
        num_beams=beam,
        num_return_sequences=beam,
        early_stopping="never",
        length_penalty=alpha,
        forced_eos_token_id=HF_EOS if force_eos else None,
    )
    out = G.translate_beam(
        model,
        params,
        jnp.asarray(src),
        dataclasses.replace(HF_SPEC, logits_processor=processor),
        max_decode_len=HF_LEN,
        beam_size=beam,
        alpha=alpha,
        length_penalty="plain",
    )
    out = jax.device_get(out)
    assert_same_tokens(out.tokens.reshape(HF_BATCH * beam, HF_LEN), theirs.sequences)
    scores = theirs.sequences_scores.numpy().reshape(HF_BATCH, beam)
    np.testing.assert_allclose(out.scores, scores, atol=1e-4)
    assert len(set(out.lengths.ravel().tolist())) >= 3


BRUTE_VOCAB, BRUTE_LEN = 5, 2
# Every output of at most 2 tokens: [eos], or [x, anything] for x != eos.
BRUTE_OUTPUTS = [[EOS]] + [
    [x, y] for x in range(BRUTE_VOCAB) if x != EOS for y in range(BRUTE_VOCAB)
]


@pytest.fixture(scope="module")
def brute():
    """A vocabulary-5 model, two sources, and every output's per-token log-probabilities."""
    model = Transformer(preset("tiny", vocab_size=BRUTE_VOCAB, tie_output=False, output_bias=True))
    rng = np.random.default_rng(0)
    dummy = jnp.ones((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)["params"])
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, jnp.float32), shapes
    )
    inputs = jnp.asarray(rng.integers(3, BRUTE_VOCAB, size=(2, 4)), jnp.int32)
    # One teacher-forced pass scores all outputs of a source; [eos] is padded to 2 tokens,
    # which the causal mask hides from its first position.
    targets = np.asarray([seq + [PAD] * (BRUTE_LEN - len(seq)) for seq in BRUTE_OUTPUTS])
    decoder_inputs = np.concatenate([np.full((len(targets), 1), BOS), targets[:, :-1]], axis=1)
    table = []
    for b in range(2):
        sources = jnp.repeat(inputs[b : b + 1], len(targets), axis=0)
        logits = model.apply({"params": params}, sources, jnp.asarray(decoder_inputs))
        log_probs = np.take_along_axis(
            np.asarray(jax.nn.log_softmax(logits)), targets[..., None], axis=-1
        )[..., 0]  # [outputs, 2]
        table.append([log_probs[i, : len(seq)].sum() for i, seq in enumerate(BRUTE_OUTPUTS)])
    return model, params, inputs, table


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_on_the_model_finds_the_brute_force_best(brute, alpha):
    """Vocabulary 5, at most 2 tokens: every hypothesis fits the beam, so nothing is pruned."""
    model, params, inputs, table = brute
    beam = G.translate_beam(
        model, params, inputs, SPEC, max_decode_len=BRUTE_LEN, beam_size=len(BRUTE_OUTPUTS),
        alpha=alpha,
    )  # fmt: skip
    for b in range(2):
        score, seq = max(
            (total / ((5 + len(seq)) / 6) ** alpha, seq)
            for total, seq in zip(table[b], BRUTE_OUTPUTS, strict=True)
        )
        assert list(np.asarray(beam.tokens[b, 0, : len(seq)])) == seq
        assert int(beam.lengths[b, 0]) == len(seq)
        assert float(beam.scores[b, 0]) == pytest.approx(score, abs=1e-5)
