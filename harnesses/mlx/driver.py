"""The locked driver: the workload, the prompts, the worker processes and the clock.

One timed unit is one generation: a fresh prompt of PROMPT_TOKENS tokens (a window of the corpus
at an offset drawn from the sample's seed), GENERATED_TOKENS tokens sampled at TEMPERATURE and
TOP_P from a seed drawn from the same seed. The driver sends the request to the pipeline's worker
and measures, in this process, on perf_counter (seconds) and on the monotonic clock
(wall_seconds), from just before the request is written to the moment its answer is read. A
"first" event, sent by the worker when the first token is out, gives time to first token, hence
prompt tokens/s; both are on this clock, and the verdict uses neither. Nothing the pipeline
prints or reports is a measurement.

Every worker runs sandboxed (lab/sandbox.py): it sees its pipeline file, the locked worker and
spec, the model (all read-only) and one scratch folder for the arrays it returns; not the lab's
cache, the references, the seeds, the run folders or any other process. While another side is
timed, every process of its sandbox (its PID namespace: threads, children, detached daemons) is
frozen, so nothing it started can work or interfere off its own clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.sdk import sandbox

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
SPEC = HERE / "spec.py"
INSIDE = {"pipeline": "/lab/pipeline/inference.py", "worker": "/lab/harness/worker.py",
          "spec": "/lab/harness/spec.py", "scratch": "/lab/scratch"}
WORKER_LIMIT_S = 24 * 3600.0  # a worker lives as long as its harness needs it; requests have deadlines

# The workload of one timed unit: fixed here, passed to the pipeline, counted on return.
PROMPT_TOKENS = 64
GENERATED_TOKENS = 64
TEMPERATURE = 0.7
TOP_P = 0.9

READY_TIMEOUT_S = 180.0  # import mlx and mlx_lm, load the model
REQUEST_TIMEOUT_S = 120.0  # one request; the lab's own timeout usually ends a hang first
LOG_TAIL = 2500


class WorkerError(Exception):
    """The pipeline raised, its process died, broke the protocol, or ran past a deadline."""


class WorkerTimeout(WorkerError):
    pass


def derive(seed: int, label: str) -> int:
    """A 63-bit seed for one purpose, drawn from a sample's or a check's seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:8], "little") >> 1


def window(corpus: list[int], offset: int, length: int) -> list[int]:
    """`length` tokens of the corpus from `offset` on, wrapping around its end."""
    n = len(corpus)
    return [corpus[(offset + i) % n] for i in range(length)]


def seeded_prompt(corpus: list[int], seed: int, length: int) -> list[int]:
    return window(corpus, derive(seed, "offset") % len(corpus), length)


@dataclass
class Answer:
    """A worker's answer to one request, with the driver's own times around it."""

    data: dict
    seconds: float  # perf_counter, request written -> answer read
    wall_seconds: float  # monotonic clock around the same interval
    first_seconds: float | None = None  # request written -> "first" event read
    events: list = field(default_factory=list)


class Worker:
    """One worker process (worker.py) serving one inference.py over a JSON-lines pipe."""

    def __init__(self, inference: Path, model_path: str, *, reference: bool = False, label: str = "worker"):
        self.label = label
        self.scratch = Path(tempfile.mkdtemp(prefix=f"lab-mlx-{label}-"))  # the sandbox's one writable folder
        self.logdir = Path(tempfile.mkdtemp(prefix=f"lab-mlx-{label}-log-"))  # outside its reach
        self.log_path = self.logdir / "stderr.log"
        self._next_id = 0
        self._buffer = bytearray()
        self._line_time = 0.0  # perf_counter when the last chunk of protocol bytes arrived
        # TMPDIR: the sandbox's /tmp is root's; mlx keeps its kernel cache under the temp folder
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}
        self.box = sandbox.Sandbox(binds=[
            sandbox.Bind(Path(inference), INSIDE["pipeline"]), sandbox.Bind(WORKER, INSIDE["worker"]),
            sandbox.Bind(SPEC, INSIDE["spec"]), *model_binds(Path(model_path)),
            sandbox.Bind(self.scratch, INSIDE["scratch"], writable=True)], env=env, python=True,
            cwd=INSIDE["scratch"])
        self.box.env = {**env, "TMPDIR": self.box.path(self.scratch), "HOME": self.box.path(self.scratch)}
        self.box.cwd = self.box.path(self.scratch)
        argv = [sys.executable, "-I", self.box.path(WORKER), "--inference", self.box.path(Path(inference)),
                "--model", str(model_path)]
        if reference:
            argv.append("--reference")
        with open(self.log_path, "wb") as log:
            self.proc = self.box.popen(argv, sandbox.Limits(seconds=WORKER_LIMIT_S, memory_bytes=None),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.ready: dict | None = None
        self.paused = False
        self._namespace: str | None = None

    # --- life cycle ------------------------------------------------------------------------
    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        if self.ready is None:
            self.resume()
            message, _ = self._read_line(time.monotonic() + timeout, "start (import and load())")
            if message.get("event") != "ready":
                self.close()
                raise WorkerError(f"{self.label}: import or load() failed: {_failure(message)}")
            self.ready = message
        return self.ready

    def pause(self) -> None:
        """Freeze every process of this worker's sandbox (all threads, children, daemons): while
        the other side is timed, nothing of this pipeline runs, so it can neither disturb that
        timing nor work off its own clock."""
        if not self.paused and self.proc.poll() is None:
            self._signal_all(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc.poll() is None:
            self._signal_all(signal.SIGCONT)
        self.paused = False

    def processes(self) -> list[int]:
        """Host pids of every process in this worker's sandbox (its PID namespace); without
        bubblewrap (--no-sandbox), its process group."""
        if self._namespace is None:
            self._namespace = sandbox_namespace(self.proc.pid) or ""
        if not self._namespace:
            return group_members(self.proc.pid)
        return namespace_members(self._namespace)

    def _signal_all(self, sig: int) -> None:
        done: set[int] = set()
        for _ in range(8):  # again until no new process appeared (one may fork while we stop)
            new = [p for p in self.processes() if p not in done]
            if not new:
                return
            for pid in new:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            done.update(new)

    def close(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        sandbox.kill(self.proc)  # the whole sandbox: nothing it started outlives it
        self._selector.close()
        shutil.rmtree(self.scratch, ignore_errors=True)  # errors quoted the log's tail already
        shutil.rmtree(self.logdir, ignore_errors=True)

    def stderr_tail(self, limit: int = LOG_TAIL) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    # --- requests --------------------------------------------------------------------------
    def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **fields) -> Answer:
        """Send one request; return its answer with the driver's times. Raises WorkerError when
        the pipeline raised (with its traceback), died, broke the protocol, or passed `timeout`."""
        self.wait_ready()
        self.resume()
        self._next_id += 1
        rid = self._next_id
        data = (json.dumps({"id": rid, "op": op, **fields}, separators=(",", ":")) + "\n").encode()
        wall0 = time.monotonic()
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(data)
        except OSError:
            raise self._died(f"{op}: the worker is gone") from None
        deadline = wall0 + timeout
        first, events = None, []
        while True:
            message, at = self._read_line(deadline, op)
            if message.get("id") != rid:
                raise self._broken(f"{op}: an answer to request {message.get('id')!r}, expected {rid}")
            if "event" in message:
                events.append(message["event"])
                if message["event"] == "first" and first is None:
                    first = at - t0
                continue
            if not message.get("ok"):
                raise WorkerError(f"{self.label}: {op} raised {_failure(message)}")
            return Answer(message, at - t0, time.monotonic() - wall0, first, events)

    def scratch_file(self, name: str) -> Path:
        return self.scratch / name

    def inside(self, path: Path) -> str:
        """`path` (under the scratch folder) as the worker sees it."""
        return self.box.path(path)

    def _read_line(self, deadline: float, what: str) -> tuple[dict, float]:
        """The next protocol line as a dict, and the perf_counter time at which it was read."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                except ValueError:
                    raise self._broken(f"{what}: not a protocol line: {line[:200]!r}") from None
                return message, self._line_time
            left = deadline - time.monotonic()
            if left <= 0:
                sandbox.kill(self.proc)
                raise WorkerTimeout(f"{self.label}: {what} did not answer within its deadline; the worker "
                                    f"was killed. {self._log_note()}")
            if self._selector.select(timeout=min(left, 1.0)):
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                self._line_time = time.perf_counter()
                if not chunk:
                    self.proc.wait()
                    raise self._died(f"{what}: the worker exited with status {self.proc.returncode}")
                self._buffer += chunk

    def _died(self, text: str) -> WorkerError:
        return WorkerError(f"{self.label}: {text}. {self._log_note()}")

    def _broken(self, text: str) -> WorkerError:
        sandbox.kill(self.proc)
        return WorkerError(f"{self.label}: protocol broken ({text}); the pipeline must not write to "
                           "the worker's protocol channel")

    def _log_note(self) -> str:
        tail = self.stderr_tail().strip()
        return f"stderr ends: {tail[-800:]}" if tail else "no stderr"


def model_binds(folder: Path) -> list:
    """The model folder, read-only at its own path, and the targets of its symbolic links (a
    hub download's snapshot links into the cache's blobs)."""
    binds = [sandbox.Bind(folder)]
    seen = {folder.resolve()}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_symlink():
            target = entry.resolve()
            if target not in seen and not any(target.is_relative_to(s) for s in seen):
                binds.append(sandbox.Bind(target))
                seen.add(target)
    return binds


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def sandbox_namespace(pid: int) -> str | None:
    """The PID namespace of the sandbox started as `pid` (bubblewrap's outer process): the first
    descendant in a namespace other than ours; None without one (--no-sandbox)."""
    own = _pid_namespace(os.getpid())
    frontier, seen = [pid], set()
    while frontier:
        p = frontier.pop()
        if p in seen:
            continue
        seen.add(p)
        ns = _pid_namespace(p)
        if ns and ns != own:
            return ns
        frontier += _children(p)
    return None


def namespace_members(namespace: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _pid_namespace(int(name)) == namespace:
            out.append(int(name))
    return out


def group_members(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def _failure(message: dict, limit: int = 1200) -> str:
    """A worker's error answer as text: the exception's line, then the end of its traceback."""
    if "error" not in message:
        return "an unexpected message: " + json.dumps(message)[:300]
    trace = str(message.get("traceback", "")).strip()
    return f"{message['error']}" + (f" | traceback ends: {trace[-limit:]}" if trace else "")


# --- the requests the harness makes --------------------------------------------------------------
def generate(worker: Worker, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
             seed: int, timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    return worker.request("generate", timeout, prompt=prompt, max_tokens=max_tokens,
                          temperature=temperature, top_p=top_p, seed=seed)


def score(worker: Worker, prompt: list[int], continuation: list[int], timeout: float = REQUEST_TIMEOUT_S):
    """The pipeline's teacher-forced logits, as a float32 numpy array (len(continuation), vocab)."""
    return _array_request(worker, "score", timeout, prompt=prompt, continuation=continuation)


def forward(reference: Worker, tokens: list[int], start: int, timeout: float = REQUEST_TIMEOUT_S):
    """The reference model's logits of positions start.. of `tokens`, in one full-sequence pass."""
    return _array_request(reference, "forward", timeout, tokens=tokens, start=start)


def verify(reference: Worker, prompt: list[int], tokens: list[int], temperature: float, top_p: float,
           seed: int, logit_eps: float, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """spec.check_stream of `tokens` on the reference's teacher-forced logits (see spec.py)."""
    answer = reference.request("verify", timeout, prompt=prompt, tokens=tokens, temperature=temperature,
                               top_p=top_p, seed=seed, tolerance={"logit_eps": logit_eps})
    return answer.data["report"]


def _array_request(worker: Worker, op: str, timeout: float, **fields):
    import numpy as np

    path = worker.scratch_file(f"{op}-{worker._next_id + 1}.npy")
    answer = worker.request(op, timeout, out=worker.inside(path), **fields)
    try:
        with open(path, "rb") as f:
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise WorkerError(f"{worker.label}: {op} left no readable array ({exc})") from None
    finally:
        path.unlink(missing_ok=True)
    if array.dtype != np.float32 or list(array.shape) != answer.data.get("shape"):
        raise WorkerError(f"{worker.label}: {op} returned {array.dtype} {array.shape}, announced {answer.data.get('shape')}")
    return array
