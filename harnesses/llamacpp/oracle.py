"""The oracle: a candidate build must compute what the pristine build computes.

Checks, each against the pristine (baseline) build of the same pinned tree, run on the same
machine and model, with the same fixed settings:

1. greedy tokens (generation path, one token per step): the harness's driver, exactly as a timed
   sample runs it (same binary, same argv, prompts drawn from the same distribution of secret
   corpus excerpts), up to N_PROBES times (the first probe that differs ends them); every token
   must be the pristine build's argmax on its teacher-forced logits, or a near-tie of it, and the
   final logits must match (driver.py). A candidate cannot tell these runs from the timed ones,
   and the timed ones are checked the same way anyway.
2. prompt logits (batched path): `llama-results` on a secret excerpt writes every position's
   logits; the harness reads both files itself and requires the same tokens and an NMSE of the
   logits under 1e-6 (llama-results' own bound; the tool's `--check` verdict is not used).
3. perplexity on the corpus (`llama-perplexity -c 128 --chunks 4`) within 0.1 % of the baseline.
4. CUDA only: test-backend-ops against the CPU for the ops of the ggml-cuda files changed.

The pristine build's perplexity is computed once per machine and cached; everything secret is
computed fresh at every check, from seeds the candidate never sees. Every tool runs sandboxed
(lab/sandbox.py: the binaries, the model and the corpus read-only, a scratch folder for its
output, nothing of the lab visible, a scrubbed environment), with a fixed thread count (results do
not depend on the timing cores) and a time limit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.sdk import Check, CheckItem, Sample, progress, sandbox

from . import driver, gguf

CORPUS = Path(__file__).resolve().parent / "data" / "declaration.txt"
N_PROBES = 3  # driver runs per check, each on its own secret prompt
CTX = 512
ORACLE_THREADS = 2  # fixed: some CPU paths split work by thread count (FA over >= 512 keys)
LOGITS_WORDS = 40  # words of the secret prompt whose logits are compared
NMSE_BOUND = 1e-6
PPL_CTX, PPL_CHUNKS = 128, 4
PPL_REL_BOUND = 1e-3
TOOL_TIMEOUT_S = 180.0
CORPUS_INSIDE = "/lab/corpus.txt"
OUT_INSIDE = "/lab/out"


@dataclass
class Tools:
    """The binaries of one build and how to run them on one model, sandboxed."""

    bindir: Path
    model: Path
    backend: str

    def common(self, box: sandbox.Sandbox) -> list[str]:
        return ["-m", box.path(self.model), "-t", str(ORACLE_THREADS), "-fa", "on", "-fit", "off",
                "-ngl", "99" if self.backend == "cuda" else "0"]

    def run(self, tool: str, args: list, timeout: float = TOOL_TIMEOUT_S, model_args: bool = True,
            out_dir: Path | None = None) -> tuple[str, str]:
        """(stdout, stderr) of one tool; ToolFailed with the reason when it fails or hangs. Path
        arguments are the corpus or files under `out_dir` (the one writable folder)."""
        extra = [sandbox.Bind(CORPUS, CORPUS_INSIDE)]
        if out_dir is not None:
            extra.append(sandbox.Bind(Path(out_dir), OUT_INSIDE, writable=True))
        gpu = self.backend == "cuda"
        box = driver.box(self.bindir, self.model, gpu=gpu, extra=tuple(extra))
        cmd = [box.path(self.bindir / tool), *(self.common(box) if model_args else []),
               *[box.path(a) if isinstance(a, Path) else a for a in args]]
        result = box.run(cmd, driver.limits(timeout, gpu))
        if result.timed_out:
            raise ToolFailed(f"{tool} did not finish within {timeout:.0f} s")
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])[-400:]
            raise ToolFailed(f"{tool} exited {_exit_text(result.returncode)}: {tail}")
        return result.stdout, result.stderr


class ToolFailed(RuntimeError):
    pass


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"on signal {signal.Signals(-code).name}"
        except ValueError:
            return f"on signal {-code}"
    return str(code)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- inputs --------------------------------------------------------------------------------------
def corpus_words() -> list[str]:
    return CORPUS.read_text().split()


def excerpt(seed: int, purpose: str, n_words: int | tuple[int, int]) -> str:
    """A secret prompt: consecutive words of the corpus at a place drawn from the seed."""
    rng = random.Random(f"{seed}:{purpose}")
    words = corpus_words()
    n = n_words if isinstance(n_words, int) else rng.randint(*n_words)
    start = rng.randrange(0, len(words) - n)
    return " ".join(words[start:start + n])


# --- the three measurements ----------------------------------------------------------------------
def prompt_logits(tools: Tools, prompt: str, out_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, logits[n_tokens, n_vocab]) as written by llama-results, read by the harness."""
    out_file = Path(out_dir) / name
    tools.run("llama-results", ["-p", prompt, "-o", out_file, "-c", str(CTX)], out_dir=out_dir)
    try:
        g = gguf.read(out_file)
        tokens = np.array(g.array("tokens"), dtype=np.int64)
        logits = np.array(g.array("logits"), dtype=np.float64)
    except (gguf.NotGGUF, OSError) as exc:
        raise ToolFailed(f"llama-results wrote no readable results: {exc}") from None
    return tokens, logits.reshape(tokens.size, -1)


PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)")


def perplexity(tools: Tools) -> float:
    out, err = tools.run("llama-perplexity", ["-f", CORPUS, "-c", str(PPL_CTX), "--chunks", str(PPL_CHUNKS)])
    found = PPL_RE.findall(out + "\n" + err)
    if not found:
        raise ToolFailed("llama-perplexity printed no final estimate")
    return float(found[-1])


def nmse(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Normalised mean squared error, as llama-results defines it: mse(a, b) / mse(a, 0)."""
    denom = float(np.sum(reference * reference))
    diff = reference - candidate
    value = float(np.sum(diff * diff)) / denom if denom > 0 else math.inf
    return value if math.isfinite(value) else math.inf


# --- the pristine build's answers ----------------------------------------------------------------
class Reference:
    """The baseline's answer for the public input (perplexity), cached in `folder` (per machine and model)."""

    def __init__(self, tools: Tools, folder: Path):
        self.tools, self.folder = tools, folder
        folder.mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str, compute):
        path = self.folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())["value"]
        value = compute()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"value": value}))
        os.replace(tmp, path)
        return value

    def perplexity(self) -> float:
        return self._cached(f"ppl-{PPL_CTX}x{PPL_CHUNKS}-{sha256_text(CORPUS.read_text())[:12]}",
                            lambda: perplexity(self.tools))


# --- the check -----------------------------------------------------------------------------------
def run(candidate: Tools, reference: Reference, seeds: list[int], changed: list[str] = (), *, greedy) -> Check:
    """The check of `candidate`; `greedy(seed)` runs one unit of the timed workload on the
    candidate and verifies it (a Sample); `changed` (files that differ from the pinned tree) picks
    the CUDA ops that test-backend-ops compares with the CPU on a CUDA build."""
    t0 = time.monotonic()
    items, lines, hashes = [], [], {}
    progress.stage(f"llama.cpp oracle: {N_PROBES} greedy probes against the baseline's logits")
    items.append(_greedy(greedy, probe_seeds(seeds), lines, hashes))
    progress.stage("llama.cpp oracle: prompt logits, candidate and baseline")
    items.append(_logits(candidate, reference, seeds, lines))
    progress.stage("llama.cpp oracle: perplexity")
    items.append(_perplexity(candidate, reference, lines))
    if candidate.backend == "cuda":
        progress.stage("llama.cpp oracle: test-backend-ops on the CUDA ops the candidate touched")
        items.append(_cuda_ops(candidate, touched_cuda_ops(changed), lines))
    passed = all(i.passed for i in items)
    lines.append(f"oracle: {'pass' if passed else 'FAIL'} ({time.monotonic() - t0:.1f} s)")
    return Check(passed=passed, items=items, lines=lines, output_hashes=hashes, seconds=time.monotonic() - t0)


def probe_seeds(seeds: list[int]) -> list[int]:
    """N_PROBES seeds for the greedy probes, drawn from the check's secret seeds."""
    base = list(seeds) or [0]
    return [int(hashlib.sha256(f"{base[i % len(base)]}:probe:{i}".encode()).hexdigest()[:15], 16)
            for i in range(N_PROBES)]


def _greedy(greedy, seeds: list[int], lines, hashes) -> CheckItem:
    """The probes in turn, up to the first that differs: one wrong answer fails the check, and the
    rest would only cost a wrong candidate's check two more driver runs and scorings to say the
    same (43-44 s -> 25 s a check on one core of the 2-core dev VM, 2026-12-03, the suite's
    greedy-only cheats)."""
    n, what = len(seeds), f"{driver.N_GEN} tokens after a secret prompt, the timed workload's driver"
    for i, seed in enumerate(seeds):
        sample: Sample = greedy(seed)
        if not sample.ok:
            lines.append(f"greedy tokens: probe {i} of {n} differs from the baseline ({what}); "
                         f"{n - i - 1} later probe(s) not run: one differing probe fails the check")
            return CheckItem("greedy_tokens", False, {"probes": n, "ran": i + 1, "differing": 1,
                                                      "n_gen": driver.N_GEN}, f"probe {i}: {sample.detail}"[:1500])
        hashes[f"greedy:probe{i}"] = sample.detail.rsplit("final logits ", 1)[-1]
    lines.append(f"greedy tokens: {n}/{n} probes match the baseline ({what})")
    return CheckItem("greedy_tokens", True, {"probes": n, "ran": n, "differing": 0, "n_gen": driver.N_GEN}, "")


def _logits(candidate: Tools, reference: Reference, seeds, lines) -> CheckItem:
    prompt = excerpt(seeds[0] if seeds else 0, "logits", LOGITS_WORDS)
    with tempfile.TemporaryDirectory(prefix="lab-llamacpp-logits-") as tmp:
        try:
            (Path(tmp) / "c").mkdir()
            (Path(tmp) / "b").mkdir()
            tok_c, log_c = prompt_logits(candidate, prompt, Path(tmp) / "c", "candidate.gguf")
            tok_b, log_b = prompt_logits(reference.tools, prompt, Path(tmp) / "b", "baseline.gguf")
        except ToolFailed as exc:
            lines.append(f"prompt logits: FAIL ({exc})")
            return CheckItem("prompt_logits", False, {}, str(exc))
    if tok_c.shape != tok_b.shape or not np.array_equal(tok_c, tok_b):
        detail = f"the candidate tokenised the prompt into {tok_c.size} tokens, the baseline into {tok_b.size}"
        lines.append(f"prompt logits: FAIL ({detail})")
        return CheckItem("prompt_logits", False, {"tokens": int(tok_c.size)}, detail)
    value = nmse(log_b, log_c)
    argmax_same = float(np.mean(np.argmax(log_b, axis=1) == np.argmax(log_c, axis=1)))
    finite = bool(np.all(np.isfinite(log_c)))
    ok = finite and value <= NMSE_BOUND
    lines.append(f"prompt logits: NMSE {value:.3g} (bound {NMSE_BOUND:g}) over {tok_c.size} positions, "
                 f"argmax agreement {argmax_same:.0%}")
    detail = "" if ok else (f"NMSE {value:.3g} > {NMSE_BOUND:g}" if finite else "non-finite logits")
    return CheckItem("prompt_logits", ok, {"nmse": value, "tokens": int(tok_c.size), "argmax_agreement": argmax_same},
                     detail)


def _perplexity(candidate: Tools, reference: Reference, lines) -> CheckItem:
    try:
        got = perplexity(candidate)
        want = reference.perplexity()
    except ToolFailed as exc:
        lines.append(f"perplexity: FAIL ({exc})")
        return CheckItem("perplexity", False, {}, str(exc))
    rel = abs(got - want) / want if math.isfinite(got) and want > 0 else math.inf
    ok = rel <= PPL_REL_BOUND
    lines.append(f"perplexity: {got:.4f} vs baseline {want:.4f} (relative difference {rel:.2g}, bound {PPL_REL_BOUND:g})")
    return CheckItem("perplexity", ok, {"ppl": got, "baseline": want, "relative": rel},
                     "" if ok else f"PPL {got:.4f} vs baseline {want:.4f}")


# --- CUDA only: the touched ops against the CPU backend --------------------------------------------
# Ops of a Gemma 3 decode step, and the ggml-cuda files that implement them. A changed file that
# is not listed (common headers, ggml-cuda.cu, the build files) touches all of them.
# The names are ggml_op_desc's, which test-backend-ops' -o matches: a GLU op goes by its kind (Gemma's
# feed-forward is GEGLU), a unary op by its function.
DECODE_OPS = ("MUL_MAT", "FLASH_ATTN_EXT", "RMS_NORM", "GEGLU", "ROPE", "GET_ROWS", "SET_ROWS", "ADD", "MUL",
              "SCALE", "CPY")
CUDA_FILE_OPS = [
    (re.compile(r"^(mmvq|mmq|mmf|mmvf|mmq-|quantize|vecdotq|dequantize|convert|mma)"), ("MUL_MAT",)),
    (re.compile(r"^fattn"), ("FLASH_ATTN_EXT",)),
    (re.compile(r"^norm"), ("RMS_NORM",)),
    (re.compile(r"^unary"), ("GEGLU",)),
    (re.compile(r"^rope"), ("ROPE",)),
    (re.compile(r"^getrows"), ("GET_ROWS",)),
    (re.compile(r"^set-rows"), ("SET_ROWS",)),
    (re.compile(r"^binbcast"), ("ADD", "MUL")),
    (re.compile(r"^scale"), ("SCALE",)),
    (re.compile(r"^cpy"), ("CPY",)),
]
BACKEND_OPS_TIMEOUT_S = 900.0


def touched_cuda_ops(changed) -> tuple[str, ...]:
    ops: list[str] = []
    for rel in changed:
        if not rel.startswith("ggml/src/ggml-cuda/"):
            continue
        name = rel.rsplit("/", 1)[-1]
        hit = next((found for pattern, found in CUDA_FILE_OPS if pattern.search(name)), DECODE_OPS)
        ops += [op for op in hit if op not in ops]
    return tuple(ops)


def backend_ops_args(op: str, model: Path) -> list[str]:
    """test-backend-ops' filter for `op`: MUL_MAT's thousands of cases cut to the weight types
    the model holds (plus f16/f32), which is all a decode of this model multiplies."""
    if op != "MUL_MAT":
        return ["-o", op]
    types = sorted(set(gguf.read(model).type_names()) | {"f16", "f32"})
    return ["-o", op, "-p", f"type_a=({'|'.join(types)}),"]


def _cuda_ops(candidate: Tools, ops: tuple[str, ...], lines) -> CheckItem:
    if not ops:
        lines.append("CUDA ops: no ggml-cuda file changed; test-backend-ops not needed")
        return CheckItem("cuda_ops", True, {"ops": []})
    failed = []
    workers = str(max(1, len(os.sched_getaffinity(0))))
    for op in ops:
        try:
            out, _ = candidate.run("test-backend-ops", ["test", "-b", "CUDA0", "-j", workers,
                                                        *backend_ops_args(op, candidate.model)],
                                   timeout=BACKEND_OPS_TIMEOUT_S, model_args=False)
        except ToolFailed as exc:
            failed.append(f"{op}: {exc}")
            continue
        summary = re.findall(r"(\d+)/(\d+) tests passed", out)
        if not summary or summary[-1][0] != summary[-1][1] or summary[-1][1] == "0":
            # 0/0 is a filter that matched nothing (an H200 run once passed a broken GEGLU that
            # way, asked for "GLU"): no test is no evidence, so it fails
            failed.append(f"{op}: {summary[-1][0] + '/' + summary[-1][1] if summary else 'no'} tests passed")
    lines.append(f"CUDA ops (test-backend-ops against the CPU): {len(ops) - len(failed)}/{len(ops)} ops pass "
                 f"({', '.join(ops)})")
    return CheckItem("cuda_ops", not failed, {"ops": list(ops), "failed": len(failed)}, "; ".join(failed)[:1500])
