"""The quality oracle: what a candidate pipeline must reproduce, and how closely.

The reference is the pristine pipeline, reference.py (a locked, byte-identical copy of the
inference.py this harness ships), run in a worker of its own. From it, once per model, machine
and locked harness, the oracle computes and caches:

- the greedy tokens of three fixed prompts (16, 64 and 600 tokens: the last one crosses the
  pipeline's prefill chunk),
- the teacher-forced logits of a fixed text (96 prompt + 128 scored tokens) and its perplexity,
- the bounds: how far the reference's own pipeline (incremental, through the KV cache) lies from
  one full-sequence pass of the same model, times CALIBRATION_FACTOR, and never under the floors.
  On the float32 CPU model the two agree bit for bit, so the floors rule; on a bf16 or 4-bit
  model on a GPU the calibration widens the bounds to what reordered arithmetic legitimately does.

A candidate passes when, in a worker of its own:

- greedy_parity: its greedy tokens on the fixed prompts equal the reference's, or differ only at
  near-ties (then every token is checked against the reference's teacher-forced logits);
- teacher_forced_logits: its score() logits on the fixed text lie within the max-abs and mean-KL
  bounds of the reference's (this is what catches a quantised or truncated KV cache);
- perplexity: its perplexity of the fixed text is within the relative bound of the reference's;
- for each secret seed: a sampled stream of exactly a timed unit's shape (a PROMPT_TOKENS window
  of the corpus at a secret offset, GENERATED_TOKENS at the workload's temperature and top-p,
  a secret sampler seed: a pipeline cannot tell it from a timed call) whose every token is what
  spec.py draws from the reference's logits with that seed (argmax, no top-p, other noise, a
  skipped prompt all fail), the same request again giving the same tokens; then, on a prompt of
  secret length and offset, a sampled stream at temperature 1 and top-p 0.5 and a greedy
  stream, each checked the same way (every timed call is checked the same way too);
- every request returned exactly the number of tokens asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lab.sdk import Check, CheckItem

from . import driver, spec
from .driver import Worker, WorkerError

GREEDY_PROBES = ((16, 0), (64, 311), (600, 707))  # (prompt tokens, corpus offset)
GREEDY_TOKENS = 32
SCORED_TEXT = (96, 128, 133)  # (prompt tokens, scored tokens, corpus offset)
SECRET_PROMPT_TOKENS = (24, 160)  # the range a secret probe's prompt length is drawn from
# A second sampled stream, away from the workload's settings: a pipeline must honour the settings
# it is given, and at top-p 0.5 a sampler that skips the nucleus leaves it on most steps (at 0.9
# it may stay inside for a whole 64-token stream).
NUCLEUS_PROBE = (1.0, 0.5)  # temperature, top-p

LOGITS_MAX_ABS_FLOOR = 1e-3  # logits of the tiny model spread about 2.8: a 0.04% change
LOGITS_MEAN_KL_FLOOR = 1e-6  # nats; an 8-bit KV cache gives about 1e-3, a 4-bit one 0.2
PERPLEXITY_REL_FLOOR = 1e-4
CALIBRATION_FACTOR = 4.0


@dataclass
class Reference:
    greedy: list  # one token list per GREEDY_PROBES entry
    perplexity: float
    bounds: dict  # logits_max_abs, logits_mean_kl, perplexity_rel
    calibration: dict  # the reference pipeline against one full-sequence pass
    device: str
    seconds: float
    scored_logits: np.ndarray | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("scored_logits")
        return json.dumps(data, indent=1, sort_keys=True)


# --- the probes --------------------------------------------------------------------------------
def greedy_prompts(corpus: list[int]) -> list[list[int]]:
    return [driver.window(corpus, offset, length) for length, offset in GREEDY_PROBES]


def scored_text(corpus: list[int]) -> tuple[list[int], list[int]]:
    prompt_len, scored, offset = SCORED_TEXT
    text = driver.window(corpus, offset, prompt_len + scored)
    return text[:prompt_len], text[prompt_len:]


def secret_prompt(corpus: list[int], seed: int) -> list[int]:
    lo, hi = SECRET_PROMPT_TOKENS
    length = lo + driver.derive(seed, "check-length") % (hi - lo + 1)
    return driver.seeded_prompt(corpus, driver.derive(seed, "check-prompt"), length)


# --- logits arithmetic ---------------------------------------------------------------------------
def compare_logits(candidate: np.ndarray, reference: np.ndarray, targets: list[int]) -> dict:
    """max |difference|, mean KL(reference || candidate), and both perplexities of `targets`."""
    lr, lc = spec.log_softmax(reference), spec.log_softmax(candidate)
    kl = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    rows = np.arange(len(targets))
    ppl_r = float(np.exp(-lr[rows, targets].mean()))
    ppl_c = float(np.exp(-lc[rows, targets].mean()))
    return {"max_abs": float(np.abs(candidate.astype(np.float64) - reference).max()),
            "mean_kl": float(kl.mean()), "perplexity": ppl_c, "reference_perplexity": ppl_r,
            "perplexity_rel": abs(ppl_c / ppl_r - 1.0)}


def bounds_from(calibration: dict) -> dict:
    return {
        "logits_max_abs": max(LOGITS_MAX_ABS_FLOOR, CALIBRATION_FACTOR * calibration["max_abs"]),
        "logits_mean_kl": max(LOGITS_MEAN_KL_FLOOR, CALIBRATION_FACTOR * calibration["mean_kl"]),
        "perplexity_rel": max(PERPLEXITY_REL_FLOOR, CALIBRATION_FACTOR * calibration["perplexity_rel"]),
    }


# --- the reference, computed once and cached -----------------------------------------------------
def reference(folder: Path, reference_worker, corpus: list[int]) -> Reference:
    """The cached reference in `folder` (one per model, machine and locked harness), computed with
    `reference_worker()` (a ready Worker running reference.py) the first time. The entry is a
    verified one (lab.cache): re-hashed on every read, and a changed file is evicted, logged and
    computed again, never used."""
    from lab.sdk import fetch

    def make(out: Path) -> dict:
        ref = compute_reference(reference_worker(), corpus)
        with open(out / "scored_logits.npy", "wb") as f:
            np.save(f, ref.scored_logits, allow_pickle=False)
        (out / "reference.json").write_text(ref.to_json() + "\n")
        return {"device": ref.device}

    entry = fetch(folder.parent, folder.name, make)
    data = json.loads((entry.path / "reference.json").read_text())
    with open(entry.path / "scored_logits.npy", "rb") as f:
        data["scored_logits"] = np.load(f, allow_pickle=False)
    return Reference(**data)


def compute_reference(worker: Worker, corpus: list[int]) -> Reference:
    seconds = 0.0
    greedy = []
    for prompt in greedy_prompts(corpus):
        answer = driver.generate(worker, prompt, GREEDY_TOKENS, 0.0, 1.0, 0)
        seconds += answer.seconds
        greedy.append(answer.data["tokens"])
    prompt, scored = scored_text(corpus)
    pipeline = driver.score(worker, prompt, scored)
    one_pass = driver.forward(worker, prompt + scored[:-1], len(prompt) - 1)
    calibration = compare_logits(pipeline, one_pass, scored)
    return Reference(greedy=greedy, perplexity=calibration["reference_perplexity"],
                     bounds=bounds_from(calibration), calibration=calibration,
                     device=worker.wait_ready().get("device", ""), seconds=seconds, scored_logits=pipeline)


def cache_key(lock_digest: str, model_sha256: str, platform: dict) -> str:
    return hashlib.sha256(json.dumps([lock_digest, model_sha256, platform], sort_keys=True).encode()).hexdigest()[:24]


# --- the check -----------------------------------------------------------------------------------
class _Probe:
    """Collects check items; a failed request of the candidate ends the check."""

    def __init__(self):
        self.items: list[CheckItem] = []
        self.lines: list[str] = []
        self.hashes: dict[str, str] = {}

    def add(self, name: str, passed: bool, values: dict, summary: str, detail: str = "") -> None:
        self.items.append(CheckItem(name, passed, values, "" if passed else detail or summary))
        self.lines.append(f"{name}: {'pass' if passed else 'FAIL'} ({summary if passed else detail or summary})")

    def tokens(self, name: str, tokens: list[int]) -> None:
        self.hashes[name] = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()

    def result(self) -> Check:
        passed = bool(self.items) and all(i.passed for i in self.items)
        return Check(passed=passed, items=self.items, lines=self.lines, output_hashes=self.hashes)


def _count_problem(tokens, wanted: int) -> str:
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return "returned something other than a list of token ids"
    if len(tokens) != wanted:
        return f"returned {len(tokens)} tokens; the driver asked for {wanted}"
    return ""


def stream_detail(report: dict) -> str:
    bad = report.get("first_bad") or {}
    return (f"token {bad.get('step')} is {bad.get('token')}, the spec draws {bad.get('expected')}: "
            f"{bad.get('why')} ({bad.get('bad_steps', 1)} of {report['steps']} steps wrong)")


def run(candidate: Worker, reference_worker, ref: Reference, corpus: list[int], seeds: list[int]) -> Check:
    """Every probe of the module docstring, on `candidate`; stops at the first failed request."""
    probe = _Probe()
    eps = ref.bounds["logits_max_abs"]
    try:
        _greedy_parity(probe, candidate, reference_worker, ref, corpus, eps)
        _teacher_forced(probe, candidate, ref, corpus)
        for i, seed in enumerate(seeds, 1):
            _secret_streams(probe, candidate, reference_worker, corpus, seed, i, eps)
    except WorkerError as exc:
        probe.add("pipeline", False, {}, "", str(exc)[-1500:])
    return probe.result()


def _greedy_parity(probe, candidate, reference_worker, ref, corpus, eps) -> None:
    exact = ties = total = 0
    for k, (prompt, expected) in enumerate(zip(greedy_prompts(corpus), ref.greedy)):
        tokens = driver.generate(candidate, prompt, GREEDY_TOKENS, 0.0, 1.0, 0).data["tokens"]
        probe.tokens(f"greedy_{k}", tokens)
        problem = _count_problem(tokens, GREEDY_TOKENS)
        if problem:
            return probe.add("greedy_parity", False, {}, "", f"prompt {k} ({len(prompt)} tokens): {problem}")
        total += len(tokens)
        if tokens == expected:
            exact += len(tokens)
            continue
        report = driver.verify(reference_worker(), prompt, tokens, 0.0, 1.0, 0, eps)
        if not report["ok"]:
            return probe.add("greedy_parity", False, report, "",
                             f"prompt {k} ({len(prompt)} tokens): {stream_detail(report)}")
        exact += report["exact"]
        ties += report["ties"]
    probe.add("greedy_parity", True, {"prompts": len(ref.greedy), "tokens": total, "ties": ties},
              f"{len(ref.greedy)} prompts, {total} tokens, {ties} near-ties")


def _teacher_forced(probe, candidate, ref, corpus) -> None:
    prompt, scored = scored_text(corpus)
    logits = driver.score(candidate, prompt, scored)
    want = ref.scored_logits.shape
    if logits.shape != want or not np.isfinite(logits).all():
        return probe.add("teacher_forced_logits", False, {}, "",
                         f"score() gave shape {logits.shape} (finite: {bool(np.isfinite(logits).all())}); "
                         f"the reference's is {want}")
    got = compare_logits(logits, ref.scored_logits, scored)
    b = ref.bounds
    logits_ok = got["max_abs"] <= b["logits_max_abs"] and got["mean_kl"] <= b["logits_mean_kl"]
    probe.add("teacher_forced_logits", logits_ok,
              {"max_abs": got["max_abs"], "mean_kl": got["mean_kl"], "bound_max_abs": b["logits_max_abs"],
               "bound_mean_kl": b["logits_mean_kl"]},
              f"max |d| {got['max_abs']:.3g} <= {b['logits_max_abs']:.3g}, mean KL {got['mean_kl']:.3g} "
              f"<= {b['logits_mean_kl']:.3g}",
              f"max |d| {got['max_abs']:.3g} (bound {b['logits_max_abs']:.3g}), mean KL {got['mean_kl']:.3g} "
              f"(bound {b['logits_mean_kl']:.3g}) over {len(scored)} teacher-forced steps")
    ppl_ok = got["perplexity_rel"] <= b["perplexity_rel"]
    probe.add("perplexity", ppl_ok,
              {"perplexity": got["perplexity"], "reference": ref.perplexity, "bound_rel": b["perplexity_rel"]},
              f"{got['perplexity']:.6g} vs reference {ref.perplexity:.6g}",
              f"{got['perplexity']:.6g} vs reference {ref.perplexity:.6g}: off by {got['perplexity_rel']:.3g} "
              f"(bound {b['perplexity_rel']:.3g})")


def timed_shape_prompt(corpus: list[int], seed: int) -> list[int]:
    """A prompt exactly as a timed unit draws one (driver.seeded_prompt, PROMPT_TOKENS long), from
    a secret seed: the oracle's workload-settings stream cannot be told from a timed call."""
    return driver.seeded_prompt(corpus, driver.derive(seed, "check-timed-shape"), driver.PROMPT_TOKENS)


def _secret_streams(probe, candidate, reference_worker, corpus, seed, i, eps) -> None:
    secret = secret_prompt(corpus, seed)
    sampler_seed = driver.derive(seed, "check-sampler")
    n, t, p = driver.GENERATED_TOKENS, driver.TEMPERATURE, driver.TOP_P
    for name, prompt, temperature, top_p, count in (
            (f"sampled_stream_{i}", timed_shape_prompt(corpus, seed), t, p, n),
            (f"nucleus_stream_{i}", secret, *NUCLEUS_PROBE, n),
            (f"greedy_stream_{i}", secret, 0.0, 1.0, GREEDY_TOKENS)):
        tokens = driver.generate(candidate, prompt, count, temperature, top_p, sampler_seed).data["tokens"]
        probe.tokens(name, tokens)
        problem = _count_problem(tokens, count)
        if problem:
            probe.add(name, False, {}, "", f"{len(prompt)}-token prompt: {problem}")
            continue
        report = driver.verify(reference_worker(), prompt, tokens, temperature, top_p, sampler_seed, eps)
        probe.add(name, report["ok"], report,
                  f"{len(prompt)}-token prompt, {count} tokens at temperature {temperature:g}, top-p "
                  f"{top_p:g}, {report['ties']} near-ties", f"{len(prompt)}-token prompt: {stream_detail(report)}")
        if name.startswith("sampled"):
            again = driver.generate(candidate, prompt, count, temperature, top_p, sampler_seed).data["tokens"]
            same = again == tokens
            probe.add(f"repeatable_{i}", same, {},
                      "the same request gave the same tokens",
                      "the same request (prompt, seed) gave other tokens the second time")
