"""The hashed dropout: its bits against a NumPy murmur3, its rate, scaling and independence."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfjax.model.layers import Dropout, hash_bits

SHAPE = (64, 32, 256)  # a W-small batch's activations: 524,288 decisions


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser, as its reference C code writes it, in uint64 then masked."""
    h = h.astype(np.uint64)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return (h ^ (h >> 16)).astype(np.uint32)


def test_hash_bits_equal_murmur3_of_the_flat_index():
    seed = np.array([0x12345678, 0x9ABCDEF0], np.uint32)
    index = np.arange(np.prod(SHAPE), dtype=np.uint64)
    expected = _fmix32(_fmix32((index + seed[0]) & 0xFFFFFFFF) ^ seed[1]).reshape(SHAPE)
    got = jax.jit(hash_bits, static_argnums=1)(seed, SHAPE)
    np.testing.assert_array_equal(np.asarray(got), expected)


def _apply(rate: float, rng: int, x: jax.Array, deterministic: bool = False) -> np.ndarray:
    rngs = {"dropout": jax.random.key(rng)}
    return np.asarray(Dropout(rate).apply({}, x, deterministic=deterministic, rngs=rngs))


def test_drops_at_the_rate_and_scales_what_it_keeps():
    x = jnp.ones(SHAPE)
    for rate in (0.1, 0.3):
        out = _apply(rate, 0, x)
        dropped = (out == 0).mean()
        sigma = np.sqrt(rate * (1 - rate) / out.size)
        assert abs(dropped - rate) < 5 * sigma, (rate, dropped)
        np.testing.assert_array_equal(out[out != 0], np.float32(1) / np.float32(1 - rate))
    assert (_apply(0.1, 0, x, deterministic=True) == 1).all()
    assert (_apply(0.0, 0, x) == 1).all()
    assert (_apply(1.0, 0, x) == 0).all()


def test_masks_are_reproducible_and_independent():
    x = jnp.ones(SHAPE)
    first, again, other = (_apply(0.5, seed, x) == 0 for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    a, b = first.astype(np.float64), other.astype(np.float64)
    limit = 6 / np.sqrt(a.size)  # six standard errors of a correlation of independent bits
    pairs = [
        (a, b),  # another rng
        (a[..., 1:], a[..., :-1]),  # neighbours along the features
        (a[:, 1:], a[:, :-1]),  # along the positions
        (a[1:], a[:-1]),  # along the rows
    ]
    for u, v in pairs:
        assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < limit


def test_two_dropouts_in_one_module_draw_different_masks():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dropout(0.5)(x, deterministic=False), Dropout(0.5)(x, deterministic=False)

    one, two = Two().apply({}, jnp.ones((8, 1024)), rngs={"dropout": jax.random.key(3)})
    assert 0.4 < ((one == 0) == (two == 0)).mean() < 0.6  # agree about as often as chance
