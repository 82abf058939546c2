"""Semantics of tfjax.model: masks, packing, the decode cache, attention, sizes and dtypes."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tfjax import beam_search
from tfjax.model import Transformer, TransformerConfig, preset
from tfjax.model.attention import Attention
from tfjax.model.layers import (
    AXES,
    EMBED,
    HEADS,
    KV,
    LENGTH,
    MLP,
    VOCAB,
    add_bias,
    product,
    sinusoids,
)
from tfjax.model.transformer import LOGITS_TABLE, LOGITS_TABLE_ROWS, tied_logits, with_logits_table
from tfjax.sharding import DEFAULT_RULES

PAD = 0
BOS = 2


@pytest.fixture(scope="module")
def tiny():
    """A tiny post-LN model and its parameters, shared by the tests in this module."""
    cfg = preset("tiny")
    model = Transformer(cfg)
    src = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    return cfg, model, params


@pytest.fixture(scope="module")
def forward(tiny):
    cfg, model, params = tiny
    return jax.jit(lambda *args: model.apply({"params": params}, *args))


def _tokens(rng, shape, vocab=64):
    return jnp.asarray(rng.integers(4, vocab, size=shape), jnp.int32)


def test_causality(forward):
    rng = np.random.default_rng(0)
    src, tgt = _tokens(rng, (2, 7)), _tokens(rng, (2, 9))
    base = forward(src, tgt)
    for t in (1, 4, 8):
        changed = forward(src, tgt.at[:, t].set((tgt[:, t] + 1) % 60 + 4))
        np.testing.assert_array_equal(base[:, :t], changed[:, :t])
        assert np.abs(base[:, t:] - changed[:, t:]).max() > 1e-3  # the change is seen later


def test_source_padding_is_invisible(tiny, forward):
    cfg, model, params = tiny
    rng = np.random.default_rng(1)
    src, tgt = _tokens(rng, (1, 6)), _tokens(rng, (1, 5))
    padded = jnp.pad(src, ((0, 0), (0, 5)), constant_values=PAD)
    np.testing.assert_allclose(forward(src, tgt), forward(padded, tgt), atol=1e-6)
    encode = jax.jit(lambda s: model.apply({"params": params}, s, method=model.encode))
    np.testing.assert_allclose(encode(src), encode(padded)[:, :6], atol=1e-6)


def test_packed_rows_equal_separate_pairs(tiny, forward):
    cfg, model, params = tiny
    rng = np.random.default_rng(2)
    (s1, t1), (s2, t2) = [(_tokens(rng, (1, n)), _tokens(rng, (1, m))) for n, m in ((5, 4), (3, 6))]
    src = jnp.concatenate([s1, s2, jnp.zeros((1, 2), jnp.int32)], axis=1)  # [1, 10]
    tgt = jnp.concatenate([t1, t2, jnp.zeros((1, 3), jnp.int32)], axis=1)  # [1, 13]
    src_seg = jnp.array([[1] * 5 + [2] * 3 + [0] * 2])
    src_pos = jnp.array([list(range(5)) + list(range(3)) + [0, 0]])
    tgt_seg = jnp.array([[1] * 4 + [2] * 6 + [0] * 3])
    tgt_pos = jnp.array([list(range(4)) + list(range(6)) + [0] * 3])
    packed = jax.jit(model.apply)({"params": params}, src, tgt, src_seg, src_pos, tgt_seg, tgt_pos)
    np.testing.assert_allclose(packed[:, :4], forward(s1, t1), atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:10], forward(s2, t2), atol=1e-5)


def _decode_stepwise(model, params, src, tgt, beams=1, max_len=None):
    """Logits [rows, T, V] from the cache, one token at a time; rows = sentences * beams."""
    rows, length = tgt.shape

    @jax.jit
    def init_cache(src):
        enc = model.apply({"params": params}, src, method=model.encode)
        return model.apply(
            {"params": params}, enc, src, rows, max_len or length,
            method=model.init_cache, mutable=["cache"],
        )[1]  # fmt: skip

    state = init_cache(src)
    step = jax.jit(
        lambda cache, ids: model.apply(
            {"params": params, "cache": cache}, ids, method=model.decode_step, mutable=["cache"]
        )
    )
    cache, out = state["cache"], []
    for t in range(length):
        logits, state = step(cache, tgt[:, t : t + 1])
        cache = state["cache"]
        out.append(logits)
    return jnp.stack(out, axis=1), cache


def test_cache_reproduces_teacher_forcing(tiny, forward):
    cfg, model, params = tiny
    rng = np.random.default_rng(3)
    src = _tokens(rng, (2, 7)).at[1, 5:].set(PAD)
    tgt = _tokens(rng, (2, 6)).at[:, 0].set(BOS)
    stepwise, _ = _decode_stepwise(model, params, src, tgt, max_len=10)
    assert float(jnp.abs(stepwise - forward(src, tgt)).max()) <= 1e-5


def test_beams_share_one_copy_of_cross_attention_keys(tiny, forward):
    """Rows b*beams..b*beams+beams-1 decode sentence b against one stored key/value set."""
    cfg, model, params = tiny
    rng = np.random.default_rng(4)
    beams = 3
    src = _tokens(rng, (2, 7)).at[0, 4:].set(PAD)
    tgt = _tokens(rng, (2 * beams, 5)).at[:, 0].set(BOS)
    stepwise, cache = _decode_stepwise(model, params, src, tgt, beams=beams)
    full = forward(jnp.repeat(src, beams, axis=0), tgt)
    assert float(jnp.abs(stepwise - full).max()) <= 1e-5
    layer = cache["decoder"]["layer_0"]
    # Positions last, the layout the attention dots read; self-attention slots per sentence
    # and beam, never reordered (a leading axis of sentences, not rows).
    assert layer["cross_attention"]["cached_key"].shape == (2, cfg.num_heads, cfg.kv_dim, 7)
    assert layer["self_attention"]["cached_key"].shape == (2, cfg.num_heads, cfg.kv_dim, beams, 5)
    assert cache["decoder"]["origin"].shape == (2 * beams, 5)


def _cache_and_step(model, params, src, rows: int, length: int, donate: bool = False):
    """A filled decode cache for `rows` rows of up to `length` tokens over sources src [B', S],
    and the jitted decode step (cache, ids [rows, 1]) -> (logits [rows, V], {"cache": ...})."""
    enc = model.apply({"params": params}, src, method=model.encode)
    cache = model.apply(
        {"params": params}, enc, src, rows, length, method=model.init_cache, mutable=["cache"]
    )[1]["cache"]
    step = jax.jit(
        lambda cache, ids: model.apply(
            {"params": params, "cache": cache}, ids, method=model.decode_step, mutable=["cache"]
        ),
        donate_argnums=(0,) if donate else (),
    )
    return cache, step


def test_beam_reordered_cache_reproduces_teacher_forcing_of_each_history(tiny, forward):
    """After each step the rows continue random parents (beam_search.reorder_cache, as beam search
    does); every row's logits must be the full forward pass over the history it inherited."""
    cfg, model, params = tiny
    rng = np.random.default_rng(6)
    sentences, beams, length = 2, 3, 6
    src = _tokens(rng, (sentences, 7)).at[1, 5:].set(PAD)
    tokens = np.asarray(_tokens(rng, (sentences * beams, length)).at[:, 0].set(BOS))
    cache, step = _cache_and_step(model, params, src, sentences * beams, length)
    reorder = jax.jit(beam_search.reorder_cache)
    sources = jnp.repeat(src, beams, axis=0)
    # [rows, length]: what each row's hypothesis has read so far, in its first t + 1 columns;
    # the rest is read only by later positions (causality), so one shape serves every step.
    history = tokens.copy()
    for t in range(length):
        logits, state = step(cache, jnp.asarray(history[:, t : t + 1]))
        full = forward(sources, jnp.asarray(history))[:, t]
        np.testing.assert_allclose(logits, full, atol=1e-5)
        parents = rng.integers(0, beams, size=(sentences, beams))
        cache = reorder(state["cache"], jnp.asarray(parents))
        rows = (np.arange(sentences)[:, None] * beams + parents).reshape(-1)
        history[:, : t + 1] = history[rows, : t + 1]


# An HLO instruction "%name = f32[2,4,8,3,6]{4,3,2,1,0} opcode(": its name, shape and opcode.
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])\S* ([\w-]+)\(")


def test_decode_step_updates_self_attention_caches_in_place(tiny):
    """No decode step copies a self-attention cache [B', H, K, beams, L]: it writes in place.

    `Attention._decode_step` makes its write position depend on the attention output, so XLA
    reads each cache before writing it. Without that, XLA:CPU copied every cache twice per
    step (8 copies here: 2 layers x keys and values x 2).
    """
    cfg, model, params = tiny
    sentences, beams, length = 2, 3, 6
    src = jnp.ones((sentences, 5), jnp.int32)
    cache, step = _cache_and_step(model, params, src, sentences * beams, length, donate=True)
    ids = jnp.full((sentences * beams, 1), BOS, jnp.int32)
    hlo = step.lower(cache, ids).compile().as_text()
    shape = f"f32[{sentences},{cfg.num_heads},{cfg.kv_dim},{beams},{length}]"
    instructions = [m.groups() for m in map(_HLO_INSTRUCTION.match, hlo.splitlines()) if m]
    updates = [name for name, s, op in instructions if s == shape and op == "dynamic-update-slice"]
    assert len(updates) == 2 * cfg.decoder_layers  # the pattern does find the cache writes
    copies = [name for name, s, op in instructions if s == shape and "copy" in f"{name} {op}"]
    assert copies == []


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_attention_matches_numpy_reference():
    cfg = preset("tiny")
    attention = Attention(cfg)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    mask = np.ones((2, 1, 5, 5), bool)
    mask[1, ..., 3:] = False  # the second row's last two keys are padding
    params = nn.unbox(attention.init(jax.random.key(1), x, None, mask, deterministic=True))
    params = jax.tree_util.tree_map(  # non-zero biases, so they are checked too
        lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params["params"]
    )
    out = attention.apply({"params": params}, x, None, mask, deterministic=True)

    def proj(name):  # [B, T, D] -> [B, H, T, K]
        p = params[name]
        y = np.einsum("btd,dhk->bhtk", x, p["kernel"]) + p["bias"][None, :, None, :]
        return y

    q, k, v = proj("query"), proj("key"), proj("value")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(cfg.kv_dim)  # [B, H, T, T]
    scores = np.where(mask, scores, -np.inf)
    heads = _np_softmax(scores) @ v  # [B, H, T, K]
    expected = np.einsum("bhtk,hkd->btd", heads, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _param_count(cfg: TransformerConfig) -> int:
    """Shared embedding + encoder + decoder layers, with biases; tied output, post-LN."""
    d, f = cfg.d_model, cfg.d_ff
    attention = 4 * (d * d + d)  # query, key, value, output projections with biases
    ffn = d * f + f + f * d + d
    norm = 2 * d
    encoder = cfg.num_layers * (attention + ffn + 2 * norm)
    decoder = cfg.decoder_layers * (2 * attention + ffn + 3 * norm)
    return cfg.vocab_size * d + encoder + decoder


@pytest.mark.parametrize("vocab", [32000, 37000])
def test_base_parameter_count(vocab):
    cfg = preset("base", vocab_size=vocab)
    shapes = jax.eval_shape(
        Transformer(cfg).init,
        jax.random.key(0),
        jnp.ones((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
    )
    count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))
    assert count == _param_count(cfg)
    if vocab == 37000:  # the paper's shared vocabulary; Table 3 rounds this to 65M
        assert count == 63_082_496


def test_every_parameter_has_logical_axis_names():
    cfg = preset(
        "tiny",
        share_embeddings=False,
        tie_output=False,
        output_bias=True,
        positions="learned",
        pre_norm=True,
    )
    src = jnp.ones((1, 4), jnp.int32)
    boxed = Transformer(cfg).init(jax.random.key(0), src, src)["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= {
            VOCAB,
            EMBED,
            HEADS,
            KV,
            MLP,
            LENGTH,
        }


def test_every_logical_axis_has_one_sharding_rule():
    names = [name for name, _ in DEFAULT_RULES]
    assert sorted(names) == sorted(AXES)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pre_norm=True, activation="gelu", positions="learned"),
        dict(share_embeddings=False, target_vocab_size=48, tie_output=False, output_bias=True),
        dict(
            positions="sinusoidal_half", activation="swish", scale_embeddings=False, use_bias=False
        ),
    ],
)
def test_variants_keep_cache_equal_to_teacher_forcing(overrides):
    cfg = preset("tiny", **overrides)
    model = Transformer(cfg)
    rng = np.random.default_rng(6)
    src = _tokens(rng, (2, 6), vocab=48).at[0, 4:].set(PAD)
    tgt = _tokens(rng, (2, 5), vocab=48).at[:, 0].set(BOS)
    params = nn.unbox(model.init(jax.random.key(2), src, tgt)["params"])
    full = jax.jit(model.apply)({"params": params}, src, tgt)
    assert full.shape == (2, 5, cfg.target_vocab)
    stepwise, _ = _decode_stepwise(model, params, src, tgt)
    assert float(jnp.abs(stepwise - full).max()) <= 1e-5


def test_sinusoids_follow_the_paper():
    table = sinusoids(50, 16)
    pos, i = 37, 3
    assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    half = sinusoids(50, 16, half=True)
    np.testing.assert_allclose(half[:, :8], table[:, 0::2])
    np.testing.assert_allclose(half[:, 8:], table[:, 1::2])


def test_bf16_compute_stays_close_to_fp32(tiny):
    cfg, _, params = tiny
    rng = np.random.default_rng(7)
    src, tgt = _tokens(rng, (4, 9)), _tokens(rng, (4, 8))
    fp32 = jax.jit(Transformer(cfg).apply)({"params": params}, src, tgt)
    bf16_model = Transformer(dataclasses.replace(cfg, dtype=jnp.bfloat16))
    bf16 = jax.jit(bf16_model.apply)({"params": params}, src, tgt)
    assert bf16.dtype == jnp.float32  # logits accumulate in float32 whatever the compute dtype
    p32, p16 = jax.nn.softmax(fp32), jax.nn.softmax(bf16)
    # bf16 keeps 8 significant bits; on this tiny model the probabilities move by < 0.02.
    assert float(jnp.abs(p32 - p16).max()) < 0.02
    assert float(jnp.mean(jnp.argmax(fp32, -1) == jnp.argmax(bf16, -1))) > 0.9


@pytest.mark.parametrize(
    "x_shape, k_shape, n_in",
    [((3, 5, 8), (8, 2, 4), 1), ((3, 5, 2, 4), (2, 4, 8), 2), ((7, 8), (8, 6), 1)],
    ids=["D->HK", "HK->D", "2d"],
)
def test_products_and_their_gradients_match_float64(x_shape, k_shape, n_in):
    """Value and both gradients of the bf16 product against float64 NumPy on the same
    bf16-rounded numbers: each result is the exact product rounded once to bf16; float32's
    within float32 rounding of the same."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.bfloat16)
    w = rng.normal(size=(*x_shape[: len(x_shape) - n_in], *k_shape[n_in:]))  # loss weights
    y, pull = jax.vjp(lambda a, b: product(a, b, n_in), x, k)
    dx, dk = pull(jnp.asarray(w, jnp.bfloat16))
    x64, k64, w64 = (np.asarray(a, np.float64) for a in (x, k, jnp.asarray(w, jnp.bfloat16)))
    batch = x64.ndim - n_in
    y_ref = np.tensordot(x64, k64, axes=n_in)
    dx_ref = np.tensordot(w64, k64, axes=(range(batch, w64.ndim), range(n_in, k64.ndim)))
    dk_ref = np.tensordot(x64, w64, axes=(range(batch), range(batch)))
    for got, ref in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
        rounded = np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64)
        # One rounding of an f32 sum: at most one bf16 step (2^-7 relative) from the exact
        # value's own rounding; a bf16 accumulation over 8+ terms drifts further.
        np.testing.assert_allclose(np.asarray(got, np.float64), rounded, rtol=2**-7, atol=1e-6)
    # float32 goes through the same written-out gradient, with float32 results.
    x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)
    y, pull = jax.vjp(lambda a, b: product(a, b, n_in), x32, k32)
    dx, dk = pull(jnp.asarray(w64, jnp.float32))
    for got, ref in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert got.dtype == jnp.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_add_bias_gradient_sums_rows_in_float32(dtype):
    """The bias's gradient is the cotangent summed over every leading axis, accumulated in
    float32 and rounded once: against float64 NumPy on the same rounded numbers. The value is
    the plain sum and y's gradient the cotangent itself."""
    rng = np.random.default_rng(12)
    y = jnp.asarray(rng.normal(size=(6, 40, 2, 4)), dtype)  # [B, T, H, K], a fused-QKV shape
    bias = jnp.asarray(rng.normal(size=(2, 4)), dtype)  # [H, K]
    g = jnp.asarray(rng.normal(size=y.shape), dtype)
    out, pull = jax.vjp(add_bias, y, bias)
    dy, dbias = pull(g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y + bias))
    np.testing.assert_array_equal(np.asarray(dy), np.asarray(g))
    ref = np.asarray(g, np.float64).sum(axis=(0, 1))
    assert dbias.dtype == dtype and dbias.shape == (2, 4)
    rounded = np.asarray(jnp.asarray(ref, dtype), np.float64)
    # 240 terms: a bf16 running sum drifts by several bf16 steps; f32 then one rounding does not.
    step = 2**-7 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(dbias, np.float64), rounded, rtol=step, atol=1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        add_bias(y.astype(jnp.float32), bias.astype(jnp.bfloat16))


def test_dropout_is_active_only_when_not_deterministic():
    cfg = preset("tiny", dropout_rate=0.3, attention_dropout_rate=0.3, activation_dropout_rate=0.3)
    model = Transformer(cfg)
    rng = np.random.default_rng(8)
    src, tgt = _tokens(rng, (2, 6)), _tokens(rng, (2, 5))
    params = nn.unbox(model.init(jax.random.key(0), src, tgt)["params"])
    apply = jax.jit(
        lambda key: model.apply(
            {"params": params}, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(key)}
        )
    )
    assert float(jnp.abs(apply(0) - apply(1)).max()) > 1e-3
    np.testing.assert_array_equal(apply(3), apply(3))
    evaluate = jax.jit(model.apply)
    np.testing.assert_array_equal(
        evaluate({"params": params}, src, tgt), evaluate({"params": params}, src, tgt)
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(activation="tanh"), "activation"),
        (dict(positions="rotary"), "positions"),
        (dict(d_model=30, num_heads=4), "divisible"),
        (dict(share_embeddings=True, target_vocab_size=10), "share_embeddings"),
    ],
)
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **bad)


def test_too_long_input_is_refused(tiny):
    cfg, model, params = tiny
    long = jnp.ones((1, cfg.max_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": params}, long, long[:, :4])


def test_tied_logits_gradient_matches_autodiff_of_the_einsum():
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 3, 13)), jnp.float32)

    def einsum(y, table):
        return jnp.sum(g * jnp.einsum("btd,vd->btv", y, table))

    def tied(y, table):
        return jnp.sum(g * tied_logits(y, table))

    for got, want in zip(
        jax.grad(tied, (0, 1))(y, table), jax.grad(einsum, (0, 1))(y, table), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_logits_table_keeps_cache_equal_to_teacher_forcing():
    # Decoding's [D, V] copy of the output table gives the tied table's logits where the
    # decoder reads it; a doubled copy shows where it does: at 2 rows, not past
    # LOGITS_TABLE_ROWS (doubling is exact in floating point, so logits double exactly).
    cfg = preset("tiny", vocab_size=48)
    model = Transformer(cfg)
    rng = np.random.default_rng(7)
    src = _tokens(rng, (LOGITS_TABLE_ROWS + 8, 6), vocab=48).at[0, 4:].set(PAD)
    tgt = _tokens(rng, (LOGITS_TABLE_ROWS + 8, 5), vocab=48).at[:, 0].set(BOS)
    params = nn.unbox(model.init(jax.random.key(3), src, tgt)["params"])
    tabled = with_logits_table(params)
    full = jax.jit(model.apply)({"params": params}, src, tgt)
    table = tabled["decoder"][LOGITS_TABLE]
    doubled = {**tabled, "decoder": {**tabled["decoder"], LOGITS_TABLE: 2 * table}}
    few, _ = _decode_stepwise(model, doubled, src[:2], tgt[:2])
    many, _ = _decode_stepwise(model, doubled, src, tgt)
    assert float(jnp.abs(few / 2 - full[:2]).max()) <= 1e-5
    assert float(jnp.abs(many - full).max()) <= 1e-5


@pytest.mark.parametrize("overrides", [{}, {"share_embeddings": False}, {"tie_output": False}])
def test_logits_table_is_the_output_table_transposed(overrides):
    cfg = preset("tiny", **overrides)
    src = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), src, src)["params"])
    tabled = with_logits_table(params)
    if not cfg.tie_output:
        assert tabled is params
        return
    embedding = params["shared_embedding" if cfg.share_embeddings else "target_embedding"]
    table = tabled["decoder"].pop(LOGITS_TABLE)
    np.testing.assert_array_equal(np.asarray(table), np.asarray(embedding["embedding"]).T)
    assert tabled == params
