"""The generation pipeline: the one file of this harness that an agent edits.

The locked driver imports this file in a worker process of its own and calls the three functions
below; interface.md is the contract. The driver fixes the workload (prompts, token counts,
temperature, top-p, seed), times every call on its own clock in another process, counts the
tokens, and checks each one against the reference sampler on the reference model's logits.
Everything inside these functions is yours: the KV cache, prefill chunking, the decode loop,
the sampler's implementation, compilation, memory settings.
"""

from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

PREFILL_STEP = 512  # prompt tokens per forward pass while prefilling


def load(model_path: str):
    """Load the model once per worker; whatever this returns is passed to generate and score."""
    model, _ = load_model(Path(model_path))
    return model


def _prefill(model, cache, prompt: list[int]) -> mx.array:
    """Run all prompt tokens but the last through the model, PREFILL_STEP at a time, filling the
    cache; return the last one, whose forward pass gives the first token's logits."""
    tokens = mx.array(prompt, dtype=mx.int32)
    while tokens.size > 1:
        n = min(PREFILL_STEP, tokens.size - 1)
        model(tokens[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
    return tokens


def _next_logits(model, cache, tokens: mx.array) -> mx.array:
    """One forward pass over `tokens` (appended to the cache): float32 logits of the last one."""
    return model(tokens[None], cache=cache)[0, -1].astype(mx.float32)


def _sample(logits: mx.array, noise, temperature: float, top_p: float) -> mx.array:
    """The sampler of interface.md: argmax at temperature 0, else top-p, then Gumbel-max."""
    logprobs = logits - mx.logsumexp(logits)
    if temperature == 0:
        return mx.argmax(logprobs)
    ascending = mx.sort(logprobs)
    mass_above = mx.cumsum(mx.exp(ascending), reverse=True, inclusive=False)
    dropped = (mass_above >= top_p).sum()
    kept = mx.where(logprobs < ascending[dropped], -mx.inf, logprobs)
    return mx.argmax(kept / temperature + noise)


def generate(state, prompt: list[int], max_tokens: int, temperature: float, top_p: float, seed: int):
    """Yield exactly `max_tokens` token ids continuing `prompt` (no stop on EOS)."""
    model = state
    cache = make_prompt_cache(model)
    tokens = _prefill(model, cache, prompt)
    noise = None
    for step in range(max_tokens):
        logits = _next_logits(model, cache, tokens)
        if temperature > 0 and noise is None:
            noise = mx.random.gumbel(shape=(max_tokens, logits.shape[-1]), key=mx.random.key(seed))
        token = _sample(logits, noise[step] if noise is not None else None, temperature, top_p)
        yield token.item()
        tokens = token[None]


def score(state, prompt: list[int], continuation: list[int]) -> mx.array:
    """Teacher forcing through the same cache, prefill and decode steps as generate: row i holds
    the float32 logits that predict continuation[i] from prompt + continuation[:i]."""
    model = state
    cache = make_prompt_cache(model)
    tokens = _prefill(model, cache, prompt)
    rows = []
    for token in continuation:
        rows.append(_next_logits(model, cache, tokens))
        mx.eval(rows[-1])
        tokens = mx.array([token], dtype=mx.int32)
    return mx.stack(rows)
