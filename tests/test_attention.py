"""Attention weights: a NumPy reference, the decode-step equivalence, Translator and the CLI."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ending_in_eos
from flax import linen as nn

from tfjax import cli, generate
from tfjax.model import Transformer, preset
from tfjax.model.attention import Attention
from tfjax.plot import attention_heatmap
from tfjax.translator import Attention as PairAttention
from tfjax.translator import Translator

PAD, BOS = 0, 2
ENCODER_LAYERS, DECODER_LAYERS = 1, 2  # unequal, so a stack read from the wrong side fails
PNG = b"\x89PNG\r\n\x1a\n"


def _draw(model: Transformer, rng: np.random.Generator) -> dict:
    """Parameters drawn in NumPy (compiling `model.init` would cost seconds): kernels and
    embeddings ~ N(0, 1 / d_model), biases ~ N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2)."""
    dummy = jnp.ones((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)["params"])
    std = model.config.d_model**-0.5

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        noise = rng.normal(size=leaf.shape) * (0.1 if name in ("scale", "bias") else std)
        return jnp.asarray(noise + (name == "scale"), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    """A random model, a source batch whose second row is padded, and targets [2, 6]."""
    cfg = preset("tiny", num_layers=ENCODER_LAYERS, num_decoder_layers=DECODER_LAYERS)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    src = rng.integers(4, cfg.vocab_size, size=(2, 7))
    src[1, 4:] = PAD
    tgt = rng.integers(4, cfg.vocab_size, size=(2, 6))
    return model, _draw(model, rng), jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32)


def _shifted(tgt: jax.Array) -> jax.Array:
    """bos + targets[:, :-1], written out again so the reference does not share the code."""
    return jnp.concatenate([jnp.full((tgt.shape[0], 1), BOS, tgt.dtype), tgt[:, :-1]], axis=1)


def _reference(p: dict, x, memory, mask) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(K)) from one Attention's params: [B, H, T, S].

    x [B, T, D] queries' input; memory [B, S, D] keys' input (None: x); mask broadcastable to
    [B, 1, T, S], True where allowed.
    """
    x = np.asarray(x, np.float64)
    memory = x if memory is None else np.asarray(memory, np.float64)
    q = np.einsum("BTD,DHK->BTHK", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("BSD,DHK->BSHK", memory, p["key"]["kernel"]) + p["key"]["bias"]
    scores = np.einsum("BTHK,BSHK->BHTS", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _capturing(fn):
    """fn returning (its output, {Attention path: [(x, memory, mask) per call]})."""

    def run(*args, **kwargs):
        calls = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, Attention) and context.method_name == "__call__":
                calls.setdefault(context.module.path, []).append(args[:3])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs), calls

    return run


@pytest.fixture(scope="module")
def forward(tiny):
    """One program (each costs seconds to compile) for the teacher-forced pass: its logits
    [B, T, V], the inputs of its Attention calls, the logits recorded with "intermediates"
    mutable, and `generate.attention_weights`."""
    model, params, src, tgt = tiny

    @jax.jit
    def run(p):
        plain, calls = _capturing(model.apply)({"params": p}, src, _shifted(tgt))
        # The explicit softmax path, where `plain` took jax.nn.dot_product_attention.
        recorded, _ = model.apply({"params": p}, src, _shifted(tgt), mutable=["intermediates"])
        return plain, calls, recorded, generate.attention_weights(model, p, src, tgt)

    return run(params)


def _assert_close(actual, expected) -> None:
    # float32 (XLA) against float64: differences are rounding (measured: at most 4e-7).
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-6)


def test_weights_equal_a_numpy_reference(tiny, forward):
    _, params, _, _ = tiny
    _, calls, _, weights = forward
    assert weights.encoder.shape == (2, ENCODER_LAYERS, 4, 7, 7)
    assert weights.decoder_self.shape == (2, DECODER_LAYERS, 4, 6, 6)
    assert weights.cross.shape == (2, DECODER_LAYERS, 4, 6, 7)
    for stack, layer, name, got in [
        ("encoder", 0, "self_attention", weights.encoder[:, 0]),
        ("decoder", 1, "self_attention", weights.decoder_self[:, 1]),
        ("decoder", 1, "cross_attention", weights.cross[:, 1]),
    ]:
        [(x, memory, mask)] = calls[(stack, f"layer_{layer}", name)]
        _assert_close(got, _reference(params[stack][f"layer_{layer}"][name], x, memory, mask))
    # The decoder's self-attention is causal: exactly 0 above the diagonal.
    above = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(np.asarray(weights.decoder_self)[..., above] == 0)


def test_rows_are_distributions_blind_to_source_padding(forward):
    weights = forward[3]
    for w in (weights.encoder, weights.decoder_self, weights.cross):
        assert w.dtype == jnp.float32
        np.testing.assert_allclose(np.sum(w, axis=-1), 1.0, rtol=1e-6)
    # Source row 1 is padded after 4 pieces: no query, encoder or decoder, looks there.
    assert np.all(np.asarray(weights.cross)[1, ..., 4:] == 0)
    assert np.all(np.asarray(weights.encoder)[1, ..., 4:] == 0)


def test_recording_leaves_the_logits_unchanged(forward):
    plain, _, recorded, _ = forward
    np.testing.assert_allclose(recorded, plain, rtol=1e-5, atol=1e-5)


def test_scoring_and_decoding_never_take_the_recording_path(tiny, monkeypatch):
    model, params, src, tgt = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("the recording path was traced")

    monkeypatch.setattr(Attention, "_attend_recorded", refuse)
    spec = generate.translation_spec()
    # Traced only: a program that reached the recording path would raise.
    jax.eval_shape(lambda: generate.score.__wrapped__(model, params, src, tgt, spec))
    greedy = generate.translate_greedy.__wrapped__
    beam = generate.translate_beam.__wrapped__
    jax.eval_shape(lambda: greedy(model, params, src, spec, max_decode_len=6))
    jax.eval_shape(lambda: beam(model, params, src, spec, max_decode_len=6, beam_size=2))


def test_decode_steps_attend_as_the_teacher_forced_pass(tiny, forward):
    """The weights each cached decode step computes, from the inputs its attention layers
    see, are the rows of the teacher-forced weights over the same tokens."""
    model, params, src, tgt = tiny
    length = tgt.shape[1]

    @jax.jit
    def start(p):
        """The encoder output [B, S, D] and the filled cache."""
        encoded = model.apply({"params": p}, src, method=model.encode)
        return encoded, generate.init_cache(model, p, src, 1, length)

    @jax.jit
    def step(p, cache, ids):
        """ids [B, 1] -> (the new cache, {path: [(x [B, 1, D], memory, mask)]})."""
        variables = {"params": p, "cache": cache}
        (_, state), calls = _capturing(model.apply)(
            variables, ids, method=model.decode_step, mutable=["cache"]
        )
        return state["cache"], calls

    encoded, cache = start(params)
    steps = []
    for t in range(length):
        cache, calls = step(params, cache, _shifted(tgt)[:, t : t + 1])
        steps.append(calls)
    weights = forward[3]
    causal = np.tril(np.ones((length, length), bool))
    keep = np.asarray(src != PAD)[:, None, None, :]  # [B, 1, 1, S]
    for layer in range(DECODER_LAYERS):
        p = params["decoder"][f"layer_{layer}"]
        # A layer's inputs at steps 0..T-1 -> [B, T, D].
        x_self, x_cross = (
            jnp.concatenate([s[("decoder", f"layer_{layer}", name)][0][0] for s in steps], 1)
            for name in ("self_attention", "cross_attention")
        )
        self_reference = _reference(p["self_attention"], x_self, None, causal)
        _assert_close(weights.decoder_self[:, layer], self_reference)
        cross_reference = _reference(p["cross_attention"], x_cross, encoded, keep)
        _assert_close(weights.cross[:, layer], cross_reference)


@pytest.fixture(scope="module")
def translator(uninterrupted):
    return Translator.from_workdir(uninterrupted, max_batch=4)


SENTENCES = ["zwei kinder spielen im park", "eine frau liest", "ein buch"]


def test_translations_carry_trimmed_weights(translator):
    heads = translator.config.num_heads
    layers = translator.config.decoder_layers
    for beam in (1, 3):
        translations = translator.translate(SENTENCES, beam_size=beam, attention=True)
        for sentence, t in zip(SENTENCES, translations, strict=True):
            a = t.attention
            pieces = [
                translator.tokenizer.piece(int(i)) for i in translator.tokenizer.encode(sentence)
            ]
            assert a.source_pieces == pieces and a.target_pieces == t.pieces
            size = (len(t.pieces), len(pieces))
            assert a.cross.shape == (layers, heads, *size)
            assert a.decoder_self.shape == (layers, heads, len(t.pieces), len(t.pieces))
            np.testing.assert_allclose(a.cross.sum(axis=-1), 1.0, rtol=1e-5)
    assert all(t.attention is None for t in translator.translate(SENTENCES))


def test_decoded_weights_equal_the_teacher_forced_entry_point(translator):
    sentences = ending_in_eos(translator)
    before = generate.attention_weights._cache_size()
    greedy = translator.translate(sentences, attention=True)
    forced = translator.attention(sentences, [t.text for t in greedy])
    for t, a in zip(greedy, forced, strict=True):
        assert a.target_pieces == t.pieces  # the text re-tokenizes to the decoded pieces
        np.testing.assert_allclose(a.cross, t.attention.cross, atol=1e-6)
        np.testing.assert_allclose(a.decoder_self, t.attention.decoder_self, atol=1e-6)
    # Both calls fall in one batch bucket and one length bucket: at most one new program.
    assert generate.attention_weights._cache_size() - before <= 1
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        translator.attention(sentences[:2], ["a man"])


def test_heatmap_with_pieces_no_font_has(tmp_path):
    rng = np.random.default_rng(0)
    cross = rng.dirichlet(np.ones(4), size=(2, 3, 3)).astype(np.float32)  # [layers, heads, T, S]
    attention = PairAttention(
        source_pieces=["▁我", "爱", "$5", "</s>"],
        target_pieces=["▁I", "▁love$", "</s>"],
        cross=cross,
        decoder_self=np.zeros((2, 3, 3, 3), np.float32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing-glyph warning would fail the test
        png = attention_heatmap(attention, tmp_path / "a.png", heads="all", layer=0)
        svg = attention_heatmap(attention, tmp_path / "a.svg")
    assert png.read_bytes()[:8] == PNG and b"<svg" in svg.read_bytes()[:2000]
    with pytest.raises(ValueError, match="layers are 0 to 1"):
        attention_heatmap(attention, tmp_path / "b.png", layer=2)


def test_cli_plots_the_first_translation(uninterrupted, tmp_path, capsys):
    out = tmp_path / "attention.png"
    args = ["translate", "--workdir", str(uninterrupted), "--plot-attention", str(out)]
    assert cli.main([*args, *SENTENCES]) == 0  # the translator tests' buckets: no compile
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and f"wrote {out}" in captured.err
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == PNG
    assert cli.main([*args, "--plot-layer", "3", SENTENCES[0]]) == 2  # a 1-layer decoder
    assert capsys.readouterr().err.startswith("error: --plot-layer 3")


@pytest.mark.parametrize(
    "name, problem", [("attention.jpg", "must end in one of"), ("no/attention.png", "not exist")]
)
def test_cli_refuses_a_bad_plot_path_before_restoring(tmp_path, capsys, name, problem):
    # The workdir does not exist either: its error would come first had a model been restored.
    args = ["translate", "--workdir", str(tmp_path / "none"), "ein mann"]
    assert cli.main([*args, "--plot-attention", str(tmp_path / name)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --plot-attention") and problem in line
