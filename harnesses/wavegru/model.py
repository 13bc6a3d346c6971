"""The PyTorch reference of the WaveGRU step (spec: program.md, "What the kernel computes"), any B >= 1, CPU or CUDA.

Explicit matmuls (no nn.GRU), TF32 off, fp32 by default and fp64 for calibration. Generate mode
feeds each step's sampled token back; teacher mode feeds given tokens back and reports the
probability of the given token. On CUDA the steps can run under CUDA graphs of `chunk` steps
(about 10x faster than eager at B = 1); the arithmetic is the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .weights import NAMES

START_TOKEN = 128
RMS_EPS = 1e-6
MIN_P = 0.1
TEMPERATURE = 1.0
# Per-step diagnostics that `step` returns after (token, p, h0, h1), in this order.
EXTRA = ("margin", "gap", "deficit", "forced_gap")


def log_min_p(min_p: float, dtype_is_64: bool) -> float:
    """ln(min_p), rounded to fp32 for fp32 runs: the kernel receives the same fp32 constant."""
    v = math.log(min_p)
    return v if dtype_is_64 else float(np.float32(v))


@dataclass
class Result:
    """Outputs of one run, as numpy arrays on the host."""

    tokens: np.ndarray  # int32 [T, B]: the Gumbel-max sample at each step
    p: np.ndarray  # [T, B]: p_sel (generate) or the probability of the teacher token (teacher)
    h0: np.ndarray  # [B, H] final state of layer 0
    h1: np.ndarray  # [B, H] final state of layer 1
    margin: np.ndarray  # [T, B]: top-1 minus top-2 of the perturbed kept logits
    threshold_gap: np.ndarray  # [T, B]: smallest |s_v - m - ln(min_p)| over v (min-p near-ties)
    deficit: np.ndarray  # [T, B]: top-1 perturbed logit minus the fed token's (teacher; 0 otherwise)
    forced_gap: np.ndarray  # [T, B]: s_y - m - ln(min_p) of the fed token (teacher; 0 otherwise)


def _torch():
    from lab.sdk import require

    return require("torch")


def strict_fp32(torch) -> None:
    """No TF32 anywhere: it would move logits by ~1e-4 and break exact parity."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class Reference:
    def __init__(self, weights: dict, device: str = "cpu", dtype: str = "float32",
                 temperature: float = TEMPERATURE, min_p: float = MIN_P):
        torch = _torch()
        strict_fp32(torch)
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        missing = [n for n in NAMES if n not in weights]
        if missing:
            raise ValueError(f"weights lack {missing}")
        self.w = {n: torch.as_tensor(np.asarray(weights[n]), device=self.device).to(self.dtype).contiguous()
                  for n in NAMES}
        # Transposed copies so that every product is x @ W^T written as one explicit matmul.
        for n in ("W_ih0", "W_hh0", "W_ih1", "W_hh1", "W_a", "W_b", "W_o"):
            self.w[n + "T"] = self.w[n].t().contiguous()
        self.H = self.w["W_hh0"].shape[1]
        self.V = self.w["W_o"].shape[0]
        self.temperature = float(temperature)
        self.log_min_p = log_min_p(min_p, self.dtype == torch.float64)
        self._graphs: dict = {}

    # --- one step ----------------------------------------------------------------------------
    def _rms(self, x, g):
        return x / self.torch.sqrt((x * x).mean(-1, keepdim=True) + RMS_EPS) * g

    def _gru(self, x, h, W_ihT, W_hhT, b_ih, b_hh):
        torch, H = self.torch, self.H
        gi = torch.matmul(x, W_ihT) + b_ih
        gh = torch.matmul(h, W_hhT) + b_hh
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return (1 - z) * n + z * h

    def step(self, y, h0, h1, g_t, forced=None):
        """y [B] int64, h0/h1 [B,H], g_t [B,V] noise.
        Returns (token, p, h0, h1, margin, gap, deficit, forced_gap)."""
        torch, w = self.torch, self.w
        x0 = self._rms(w["emb"].index_select(0, y), w["g0"])
        h0 = self._gru(x0, h0, w["W_ih0T"], w["W_hh0T"], w["b_ih0"], w["b_hh0"])
        x1 = self._rms(h0, w["g1"])
        h1 = self._gru(x1, h1, w["W_ih1T"], w["W_hh1T"], w["b_ih1"], w["b_hh1"])
        g = (torch.matmul(h1, w["W_aT"]) + w["b_a"]) * torch.sigmoid(torch.matmul(h1, w["W_bT"]) + w["b_b"])
        s = (torch.matmul(g, w["W_oT"]) + w["b_o"]) / self.temperature
        m = s.max(-1, keepdim=True).values
        d = s - m
        keep = d >= self.log_min_p
        pert = torch.where(keep, s + g_t, torch.full_like(s, -math.inf))
        top2 = pert.topk(2, dim=-1).values
        token = pert.argmax(-1)  # the first index attaining the maximum: the lowest one
        e = torch.where(keep, torch.exp(d), torch.zeros_like(d))
        chosen = token if forced is None else forced
        p = e.gather(-1, chosen[:, None])[:, 0] / e.sum(-1)
        margin = top2[:, 0] - top2[:, 1]
        gap = (d - self.log_min_p).abs().min(-1).values
        if forced is None:
            deficit = forced_gap = torch.zeros_like(margin)
        else:
            deficit = top2[:, 0] - (s + g_t).gather(-1, forced[:, None])[:, 0]
            forced_gap = d.gather(-1, forced[:, None])[:, 0] - self.log_min_p
        return token, p, h0, h1, margin, gap, deficit, forced_gap

    # --- whole runs ----------------------------------------------------------------------------
    def generate(self, G, graph: bool | None = None, chunk: int = 64) -> Result:
        return self._run(G, None, graph, chunk)

    def teacher(self, teacher_tokens, G, graph: bool | None = None, chunk: int = 64) -> Result:
        """Feed teacher_tokens[t-1] at step t (the start token at t = 0); p is p(teacher[t])."""
        return self._run(G, teacher_tokens, graph, chunk)

    def _run(self, G, teacher, graph, chunk) -> Result:
        torch = self.torch
        G = self._tensor(G).to(self.dtype)
        T, B, V = G.shape
        if V != self.V:
            raise ValueError(f"noise has V={V}, model has V={self.V}")
        forced_all = None
        if teacher is not None:
            forced_all = self._tensor(teacher).to(torch.int64).reshape(T, B)
        if graph is None:
            graph = self.device.type == "cuda"
        if graph and self.device.type == "cuda":
            return self._run_graph(G, forced_all, chunk)
        out = self._buffers(T, B)
        y = torch.full((B,), START_TOKEN, dtype=torch.int64, device=self.device)
        h0 = torch.zeros(B, self.H, dtype=self.dtype, device=self.device)
        h1 = torch.zeros_like(h0)
        for t in range(T):
            forced = None if forced_all is None else forced_all[t]
            tok, p, h0, h1, *extra = self.step(y, h0, h1, G[t], forced)
            out["tokens"][t], out["p"][t] = tok, p
            for k, v in zip(EXTRA, extra):
                out[k][t] = v
            y = tok if forced is None else forced
        return self._result(out, h0, h1)

    def _tensor(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.to(self.device)
        return self.torch.as_tensor(np.asarray(a), device=self.device)

    def _buffers(self, T, B):
        torch, kw = self.torch, dict(device=self.device)
        out = {"tokens": torch.empty(T, B, dtype=torch.int64, **kw)}
        for k in ("p",) + EXTRA:
            out[k] = torch.empty(T, B, dtype=self.dtype, **kw)
        return out

    def _result(self, out, h0, h1) -> Result:
        host = {k: v.cpu().numpy() for k, v in out.items()}
        return Result(tokens=host["tokens"].astype(np.int32), p=host["p"], h0=h0.cpu().numpy(),
                      h1=h1.cpu().numpy(), margin=host["margin"], threshold_gap=host["gap"],
                      deficit=host["deficit"], forced_gap=host["forced_gap"])

    def _run_graph(self, G, forced_all, chunk) -> Result:
        """The same steps, captured `chunk` at a time into one CUDA graph and replayed."""
        T, B, V = G.shape
        teacher = forced_all is not None
        key = (B, chunk, teacher)
        if key not in self._graphs:
            self._graphs[key] = self._capture(B, chunk, teacher)
        st = self._graphs[key]
        out = self._buffers(T, B)
        st["y"].fill_(START_TOKEN)
        st["h0"].zero_()
        st["h1"].zero_()
        for t0 in range(0, T, chunk):
            n = min(chunk, T - t0)
            st["G"][:n].copy_(G[t0:t0 + n])
            if teacher:
                st["forced"][:n].copy_(forced_all[t0:t0 + n])
            if n == chunk:
                st["graph"].replay()
            else:  # a ragged last chunk runs eagerly on the same static buffers
                self._chunk_body(st, n, teacher)
            for k in ("tokens", "p") + EXTRA:
                out[k][t0:t0 + n].copy_(st[k][:n])
        return self._result(out, st["h0"].clone(), st["h1"].clone())

    def _chunk_body(self, st, n, teacher):
        y, h0, h1 = st["y"], st["h0"], st["h1"]
        for i in range(n):
            forced = st["forced"][i] if teacher else None
            tok, p, h0n, h1n, *extra = self.step(y, h0, h1, st["G"][i], forced)
            st["tokens"][i].copy_(tok)
            st["p"][i].copy_(p)
            for k, v in zip(EXTRA, extra):
                st[k][i].copy_(v)
            h0.copy_(h0n)
            h1.copy_(h1n)
            y.copy_(tok if forced is None else forced)

    def _capture(self, B, chunk, teacher):
        torch, kw = self.torch, dict(device=self.device)
        st = self._buffers(chunk, B)
        st.update(G=torch.zeros(chunk, B, self.V, dtype=self.dtype, **kw),
                  forced=torch.zeros(chunk, B, dtype=torch.int64, **kw),
                  y=torch.full((B,), START_TOKEN, dtype=torch.int64, **kw),
                  h0=torch.zeros(B, self.H, dtype=self.dtype, **kw),
                  h1=torch.zeros(B, self.H, dtype=self.dtype, **kw))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations, cuBLAS handles) off the graph
            for _ in range(2):
                self._chunk_body(st, min(chunk, 2), teacher)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._chunk_body(st, chunk, teacher)
        st["graph"] = graph
        return st
