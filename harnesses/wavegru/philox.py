"""Philox4x32-10 (Salmon et al., SC'11; Random123) in vectorised numpy, and the Gumbel noise
that the reference and the kernel share bit for bit.

G[t, b, v] = -ln(-ln U), U = ((x >> 8) + 0.5) * 2^-24, where x is word v % 4 of
Philox4x32-10(key = (seed low 32 bits, seed high 32 bits), counter = (v // 4, t, b, 0)).
The logarithms are taken in float64 and the result is handed over as float32.
"""

from __future__ import annotations

import numpy as np

M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = 0x9E3779B9
W1 = 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)
ROUNDS = 10


def philox4x32(counter, key, rounds: int = ROUNDS) -> np.ndarray:
    """counter: (..., 4) uint32-valued; key: (k0, k1). Returns (..., 4) uint32."""
    c = np.asarray(counter, dtype=np.uint64)
    c0, c1, c2, c3 = (c[..., i].copy() for i in range(4))
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        p0 = M0 * c0  # products of two 32-bit values fit in 64 bits exactly
        p1 = M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c0 = hi1 ^ c1 ^ np.uint64(k0)
        c1 = lo1
        c2 = hi0 ^ c3 ^ np.uint64(k1)
        c3 = lo0
        if r + 1 < rounds:
            k0 = (k0 + W0) & 0xFFFFFFFF
            k1 = (k1 + W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def seed_key(seed: int) -> tuple[int, int]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & 0xFFFFFFFF, seed >> 32


def uniforms(seed: int, T: int, B: int, V: int = 256) -> np.ndarray:
    """U[T, B, V] in (0, 1), float64, exactly as the spec defines it."""
    if V % 4:
        raise ValueError(f"V must be a multiple of 4 (got {V})")
    Q = V // 4
    t, b, q = np.meshgrid(np.arange(T, dtype=np.uint64), np.arange(B, dtype=np.uint64),
                          np.arange(Q, dtype=np.uint64), indexing="ij")
    ctr = np.stack([q, t, b, np.zeros_like(q)], axis=-1)  # (T, B, Q, 4)
    x = philox4x32(ctr, seed_key(seed)).reshape(T, B, V)  # word i of quad q -> v = 4q + i
    return ((x >> 8).astype(np.float64) + 0.5) * (2.0 ** -24)


def gumbel(seed: int, T: int, B: int, V: int = 256) -> np.ndarray:
    """G[T, B, V] = -ln(-ln U) computed in float64, returned as float32 (C-contiguous)."""
    u = uniforms(seed, T, B, V)
    np.log(u, out=u)
    np.negative(u, out=u)
    np.log(u, out=u)
    np.negative(u, out=u)
    return np.ascontiguousarray(u.astype(np.float32))


def gumbel_torch(seed: int, T: int, B: int, V: int = 256, device="cuda"):
    """The same G as `gumbel`, computed with torch on `device` (for the timed samples, where
    16k steps of noise on the host would dominate the evaluation). Philox is integer-exact; the
    float64 logarithms agree with numpy's to the last fp32 bit except in astronomically rare
    cases, and the kernel and the reference always receive the same tensor either way."""
    from lab.sdk import require

    torch = require("torch")
    Q = V // 4
    mask = 0xFFFFFFFF
    t = torch.arange(T, dtype=torch.int64, device=device).view(T, 1, 1).expand(T, B, Q)
    b = torch.arange(B, dtype=torch.int64, device=device).view(1, B, 1).expand(T, B, Q)
    q = torch.arange(Q, dtype=torch.int64, device=device).view(1, 1, Q).expand(T, B, Q)
    c0, c1, c2, c3 = q.clone(), t.clone(), b.clone(), torch.zeros_like(q)
    k0, k1 = seed_key(seed)
    for r in range(ROUNDS):
        # int64 products of two 32-bit values wrap like uint64; the masks recover both halves
        p0 = c0 * int(M0)
        p1 = c2 * int(M1)
        hi0, lo0 = (p0 >> 32) & mask, p0 & mask
        hi1, lo1 = (p1 >> 32) & mask, p1 & mask
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < ROUNDS:
            k0 = (k0 + W0) & mask
            k1 = (k1 + W1) & mask
    x = torch.stack([c0, c1, c2, c3], dim=-1).reshape(T, B, V)
    u = ((x >> 8).to(torch.float64) + 0.5) * (2.0 ** -24)
    return (-torch.log(-torch.log(u))).to(torch.float32).contiguous()
