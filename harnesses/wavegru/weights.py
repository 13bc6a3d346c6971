"""The model's weights, drawn from a seed and rounded to bf16-representable float32 values.

Every GRU, GLU and bias tensor U(-1/32, 1/32); emb N(0, 1); W_o and b_o U(-1, 1); g0 = g1 = 1.
Rounding to bf16 (round to nearest, ties to even) lets a kernel store the weights as bf16
without changing the mathematics; activations and accumulation stay fp32.
"""

from __future__ import annotations

import numpy as np

V, E, H, G = 256, 1024, 1024, 1024

# name -> (shape, distribution); the order is part of the definition (draws are sequential).
SPEC = (
    ("emb", (V, E), "normal"),
    ("g0", (E,), "ones"),
    ("W_ih0", (3 * H, E), "small"),
    ("W_hh0", (3 * H, H), "small"),
    ("b_ih0", (3 * H,), "small"),
    ("b_hh0", (3 * H,), "small"),
    ("g1", (H,), "ones"),
    ("W_ih1", (3 * H, H), "small"),
    ("W_hh1", (3 * H, H), "small"),
    ("b_ih1", (3 * H,), "small"),
    ("b_hh1", (3 * H,), "small"),
    ("W_a", (G, H), "small"),
    ("W_b", (G, H), "small"),
    ("b_a", (G,), "small"),
    ("b_b", (G,), "small"),
    ("W_o", (V, G), "unit"),
    ("b_o", (V,), "unit"),
)
NAMES = tuple(name for name, _, _ in SPEC)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Nearest bf16-representable float32 (ties to even); NaN and Inf are not expected."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def is_bf16_exact(x: np.ndarray) -> bool:
    return bool(np.all((np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & 0xFFFF) == 0))


def make_weights(seed: int) -> dict[str, np.ndarray]:
    """All parameters as C-contiguous float32 arrays, bf16-representable, in SPEC order."""
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    out = {}
    for name, shape, dist in SPEC:
        if dist == "ones":
            w = np.ones(shape, dtype=np.float32)
        elif dist == "normal":
            w = rng.standard_normal(shape, dtype=np.float32)
        else:
            bound = 1.0 / 32.0 if dist == "small" else 1.0
            w = (rng.random(shape, dtype=np.float32) * 2.0 - 1.0) * np.float32(bound)
        out[name] = round_to_bf16(w)
    return out
