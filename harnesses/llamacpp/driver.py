"""The timed run is the checked run: the harness's own driver (driver.cpp), its prompts, its clock
and the check of every answer.

One unit of work (a timed sample, and each of the oracle's greedy probes: the same binary, the
same argv, prompts drawn the same way) is one `lab-llama-driver` process, sandboxed: it loads the
model, warms up, says ready, and reads one request: N_GEN greedy tokens after a secret prompt (a
12-24-word excerpt of the corpus drawn from the sample's seed). The harness times the request on
its own clock, from the moment it writes the request to the moment it reads the answer (prompt
decode included; N_GEN = 64 tokens, so that a pair plus the reference's teacher-forced pass costs
no more than the two 128-token llama-bench runs a pair used to), and cross-checks the times the driver reports against it. The process must
then exit; under bubblewrap its PID namespace dies with it, so nothing it started outlives it.

Every answer is verified before its time counts: the pristine build's driver, in score mode, runs
the generation's own path teacher-forced on the candidate's tokens (the prompt in one batch, then
one token per decode: where the tokens are its own choices, bit for bit its own generation) and
gives, at each step, the reference's best logit and the logit of the token the candidate chose. A token passes when it is
the reference's argmax or within TIE_REL x (that row's RMS logit) of it: the oracle's NMSE bound
(1e-6, an RMS error of 1e-3 of the row) on both sides, so that a legitimate reordering of sums may
flip a near-tie, and nothing else. The digest of the logits after the last token (top 8, sum of
squares) must match the reference's last row within the same bound. A sample that skipped work,
lowered precision, or returned too few tokens fails, and with it the candidate.
"""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.sdk import sandbox

DRIVER = "lab-llama-driver"
N_GEN = 64
CTX = 512
PROMPT_WORDS = (12, 24)
TIE_REL = 2 * math.sqrt(1e-6)  # 2 x the RMS error the oracle's NMSE bound allows
READY_TIMEOUT_S = 120.0  # load, repack, warm-up
ANSWER_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 30.0
REPORT_SLACK_S = 0.005  # the driver's own timings may not exceed the harness's interval by more
MODEL_INSIDE = "/lab/model.gguf"
BIN_INSIDE = "/lab/bin"


class DriverFailed(RuntimeError):
    """The driver died, broke the protocol, or ran past a deadline: the sample fails."""


# --- prompts -----------------------------------------------------------------------------------
def prompt(corpus_words: list[str], seed: int) -> str:
    """The secret prompt of one unit of work: consecutive corpus words at a place drawn from the seed.
    The oracle's greedy probes and the timed samples both draw them here."""
    rng = random.Random(f"{seed}:driver-prompt")
    n = rng.randint(*PROMPT_WORDS)
    start = rng.randrange(0, len(corpus_words) - n)
    return " ".join(corpus_words[start:start + n])


# --- the sandbox -------------------------------------------------------------------------------
def box(bindir: Path, model: Path, *, gpu: bool, extra: tuple = ()) -> sandbox.Sandbox:
    """A sandbox that sees the build's binaries and the model, read-only, and nothing of the lab:
    the same for the driver, llama-bench and the oracle's tools."""
    binds = [sandbox.Bind(Path(bindir), BIN_INSIDE), sandbox.Bind(Path(model), MODEL_INSIDE), *extra]
    return sandbox.Sandbox(binds=binds, gpu=gpu, python=False, cwd="/tmp")


def limits(seconds: float, gpu: bool) -> sandbox.Limits:
    return sandbox.Limits(seconds=seconds, memory_bytes=None if gpu else 8 << 30, processes=4096)


def argv(sb: sandbox.Sandbox, bindir: Path, model: Path, *, threads: int, gpu_layers: int,
         score: bool = False) -> list[str]:
    cmd = [sb.path(Path(bindir) / DRIVER), sb.path(model), str(threads), str(gpu_layers), str(CTX)]
    return cmd + (["--score"] if score else [])


# --- one unit of work --------------------------------------------------------------------------
@dataclass
class Answer:
    tokens: list
    n_prompt: int
    final: dict
    seconds: float  # the harness's perf_counter: request written -> answer read
    wall_seconds: float  # the harness's monotonic clock, the same interval
    reported_s: float  # the driver's own prefill + decode time (never a measurement)
    process_seconds: float = 0.0
    raw: dict = field(default_factory=dict)


class _Lines:
    """JSON lines from a process's stdout with deadlines, on the trusted side's clock."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buffer = proc, bytearray()
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.at = 0.0

    def read(self, deadline: float, what: str) -> dict:
        while True:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self.buffer[:newline])
                del self.buffer[:newline + 1]
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError
                except ValueError:
                    raise DriverFailed(f"{what}: not a protocol line: {line[:200]!r}") from None
                if "error" in message:
                    raise DriverFailed(f"{what}: the driver failed: {str(message['error'])[:200]}")
                return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverFailed(f"{what}: no answer within the deadline")
            if self.selector.select(timeout=min(left, 1.0)):
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                self.at = time.perf_counter()
                if not chunk:
                    code = self.proc.wait()
                    raise DriverFailed(f"{what}: the driver exited with status {code} before answering")
                self.buffer += chunk

    def close(self):
        self.selector.close()


def run_once(sb: sandbox.Sandbox, cmd: list[str], text: str, n_gen: int = N_GEN, gpu: bool = False) -> Answer:
    """Start the driver, wait for ready, time one request, and see the process gone."""
    started = time.monotonic()
    proc = sb.popen(cmd, limits(READY_TIMEOUT_S + ANSWER_TIMEOUT_S + EXIT_TIMEOUT_S, gpu),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = _Lines(proc)
    try:
        ready = lines.read(time.monotonic() + READY_TIMEOUT_S, "start")
        if ready.get("event") != "ready":
            raise DriverFailed(f"start: expected ready, got {json.dumps(ready)[:200]}")
        request = f"{n_gen} {text.encode().hex()}\n".encode()
        wall0 = time.monotonic()
        t0 = time.perf_counter()
        proc.stdin.write(request)
        proc.stdin.flush()
        answer = lines.read(wall0 + ANSWER_TIMEOUT_S, "generate")
        seconds = lines.at - t0
        wall = time.monotonic() - wall0
        proc.stdin.close()
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DriverFailed(f"the driver did not exit within {EXIT_TIMEOUT_S:.0f} s of its answer") from None
        if code != 0:
            raise DriverFailed(f"the driver exited with status {code} after its answer")
    except OSError as exc:
        raise DriverFailed(f"the driver's pipe broke: {exc}") from None
    finally:
        lines.close()
        sandbox.kill(proc)  # its whole sandbox: nothing it started survives it
    tokens = answer.get("tokens")
    final = answer.get("final")
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
            and isinstance(final, dict)):
        raise DriverFailed("the answer has no token list or no final-logits digest")
    reported = (_num(answer.get("prefill_us")) + _num(answer.get("decode_us"))) / 1e6
    return Answer(tokens=tokens, n_prompt=int(_num(answer.get("n_prompt"))), final=final, seconds=seconds,
                  wall_seconds=wall, reported_s=reported, process_seconds=time.monotonic() - started, raw=answer)


def _num(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


# --- the reference scorer (pristine build) ------------------------------------------------------
class Scorer:
    """The pristine build's driver in score mode: one process, many requests, sandboxed."""

    def __init__(self, sb: sandbox.Sandbox, cmd: list[str], gpu: bool = False):
        self.proc = sb.popen(cmd, limits(24 * 3600, gpu), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        self.lines = _Lines(self.proc)
        ready = self.lines.read(time.monotonic() + READY_TIMEOUT_S, "reference scorer start")
        if ready.get("event") != "ready":
            self.close()
            raise DriverFailed("the reference scorer did not start")
        self._memo: dict = {}

    def score(self, text: str, tokens: list[int]) -> dict:
        key = (text, tuple(tokens))
        if key not in self._memo:
            line = f"{text.encode().hex()} {len(tokens)} {' '.join(map(str, tokens))}\n".encode()
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            self._memo = {key: self.lines.read(time.monotonic() + ANSWER_TIMEOUT_S, "reference score")}
        return self._memo[key]

    def close(self) -> None:
        self.lines.close()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        sandbox.kill(self.proc)


# --- the check of one answer -------------------------------------------------------------------
def verify(answer: Answer, scored: dict, n_gen: int = N_GEN) -> list[str]:
    """What is wrong with `answer` against the reference's teacher-forced logits; [] when right."""
    problems = []
    tokens = answer.tokens
    if len(tokens) != n_gen:
        return [f"returned {len(tokens)} tokens, asked for {n_gen}"]
    if answer.n_prompt != scored.get("n_prompt"):
        return [f"tokenised the prompt into {answer.n_prompt} tokens, the reference into {scored.get('n_prompt')}"]
    rows = scored["rows"]
    ties = 0
    for step, (token, row) in enumerate(zip(tokens, rows)):
        best, top, value, ssq = row
        eps = TIE_REL * math.sqrt(ssq / max(1, _vocab(scored)))
        if token != best:
            if top - value > eps:
                problems.append(f"token {step} is {token}, the reference's argmax is {best} "
                                f"(logit gap {top - value:.4g} > tie tolerance {eps:.2g})")
                break
            ties += 1
    if not problems:
        problems += _final_digest(answer.final, rows[-1], scored["top"], _vocab(scored))
    return problems


def _vocab(scored: dict) -> int:
    return int(scored.get("n_vocab") or 262144)


def _final_digest(final: dict, row: list, ref_top: list, n_vocab: int) -> list[str]:
    """The logits after the last token, against the reference's last row."""
    top = final.get("top")
    ssq = _num(final.get("sumsq"))
    ref_ssq = row[3]
    rms = math.sqrt(ref_ssq / n_vocab)
    eps = TIE_REL * rms
    if not isinstance(top, list) or not top or not math.isfinite(ssq):
        return ["the final-logits digest is missing"]
    if abs(math.sqrt(ssq / n_vocab) - rms) > eps:
        return [f"final logits: RMS {math.sqrt(ssq / n_vocab):.6g}, the reference's {rms:.6g} (bound {eps:.2g})"]
    ref = {int(i): float(v) for i, v in ref_top}
    for item in top:
        try:
            tid, value = int(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            return ["the final-logits digest is malformed"]
        if tid not in ref:
            return [f"final logits: token {tid} is in the candidate's top 8 but not in the reference's top 64"]
        if abs(value - ref[tid]) > eps:
            return [f"final logits: token {tid} has logit {value:.6g}, the reference {ref[tid]:.6g} (bound {eps:.2g})"]
    return []
