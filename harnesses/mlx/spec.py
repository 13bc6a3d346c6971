"""The sampler that every pipeline implements, and the check of a token stream against it.

For step t of a generation of `max_tokens` tokens from `seed` (interface.md says the same):

    logprobs_t = log_softmax(float32 logits_t)                  the model's next-token logits
    temperature == 0:  token_t = argmax(logprobs_t)
    temperature > 0:   kept_t  = the most probable tokens whose probabilities, summed from the
                                 top, first reach top_p (every token as probable as the last one
                                 kept is kept too); as mlx_lm's apply_top_p
                       noise   = mx.random.gumbel(shape=(max_tokens, vocab), key=mx.random.key(seed))
                       token_t = argmax over kept_t of (logprobs_t / temperature + noise[t])

The Gumbel-max form makes sampling a deterministic function of the seed: a pipeline that samples
otherwise (argmax, no top-p, other noise, another temperature) draws other tokens.

`check_stream` runs in the reference worker on teacher-forced reference logits (the logits the
reference model gives at every step of the candidate's own stream), in float64, so that every
token is checked where it was drawn and one legitimate near-tie does not throw the rest of the
stream out of step. Tolerance: a pipeline whose logits lie within `logit_eps` of the reference's
(the bound the oracle enforces on teacher-forced logits) may pick any token whose score is
within 2 * logit_eps / temperature of the best, from a nucleus whose mass may be off by
2 * logit_eps. Nothing else is accepted.

Pure numpy; `noise` takes the mlx module as an argument so that this file imports no mlx.
"""

from __future__ import annotations

import numpy as np


def noise(mx, seed: int, steps: int, vocab: int):
    """The Gumbel noise of a sampled generation (float32, shape (steps, vocab))."""
    return mx.random.gumbel(shape=(steps, vocab), key=mx.random.key(seed))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def nucleus(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask (steps, vocab) of the tokens kept by top-p at each step."""
    p = np.exp(logprobs)
    ordered = -np.sort(-p, axis=-1)
    before = np.cumsum(ordered, axis=-1) - ordered  # mass strictly above each sorted position
    count = np.maximum((before < top_p).sum(axis=-1), 1)
    threshold = np.take_along_axis(ordered, (count - 1)[:, None], axis=-1)
    return p >= threshold


def check_stream(logits: np.ndarray, gumbel: np.ndarray | None, tokens: list[int], temperature: float,
                 top_p: float, *, logit_eps: float) -> dict:
    """Check `tokens` step by step against the spec on `logits` (steps, vocab). A plain dict:
    ok, steps, exact (tokens equal to the spec's choice), ties (accepted near-ties), first_bad."""
    tokens_arr = np.asarray(tokens, dtype=np.int64)
    steps = len(tokens_arr)
    report = {"ok": True, "steps": steps, "exact": 0, "ties": 0, "first_bad": None}
    if steps == 0:
        return report
    vocab = logits.shape[-1]
    if logits.shape[0] != steps:
        return {**report, "ok": False, "first_bad": {"step": 0, "why": f"{logits.shape[0]} logit rows for {steps} tokens"}}
    out_of_range = np.nonzero((tokens_arr < 0) | (tokens_arr >= vocab))[0]
    if out_of_range.size:
        t = int(out_of_range[0])
        return {**report, "ok": False, "first_bad": {"step": t, "token": int(tokens_arr[t]),
                                                     "why": f"token id outside the vocabulary of {vocab}"}}
    lp = log_softmax(logits)
    if temperature == 0:
        score, allowed, eps = lp, np.ones_like(lp, dtype=bool), 2 * logit_eps
        best_mask = allowed
    else:
        score = lp / temperature + np.asarray(gumbel, dtype=np.float64)[:steps]
        best_mask = nucleus(lp, top_p - 2 * logit_eps)  # a token the candidate must consider
        allowed = nucleus(lp, top_p + 2 * logit_eps)  # a token the candidate may consider
        eps = 2 * logit_eps / temperature
    best = np.where(best_mask, score, -np.inf).argmax(axis=-1)
    rows = np.arange(steps)
    chosen = score[rows, tokens_arr]
    gap = score[rows, best] - chosen
    good = allowed[rows, tokens_arr] & (gap <= eps)
    report["exact"] = int((tokens_arr == best).sum())
    report["ties"] = int((good & (tokens_arr != best)).sum())
    if not good.all():
        t = int(np.nonzero(~good)[0][0])
        why = ("outside the top-p nucleus" if not allowed[t, tokens_arr[t]]
               else f"score {gap[t]:.4g} below the spec's choice (tolerance {eps:.2g})")
        report.update(ok=False, first_bad={"step": t, "token": int(tokens_arr[t]), "expected": int(best[t]),
                                           "why": why, "bad_steps": int((~good).sum())})
    return report
