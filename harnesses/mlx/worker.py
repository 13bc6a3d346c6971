"""The worker: one process that imports one inference.py and answers the driver's requests.

    python -I worker.py --inference FILE --model DIR [--reference]

The harness (driver.py) starts it, writes one JSON request per line to its stdin and reads one
JSON line per event from a private copy of its stdout. Before anything of the candidate is
imported, file descriptor 1 is pointed at stderr: whatever the pipeline prints, from Python or
from C, lands in the worker's log and is parsed by nobody. The worker measures no time that
matters: the driver times every request on its own clock, in its own process.

Requests and answers (every answer carries the request's "id"):

    {"op": "generate", "prompt": [...], "max_tokens": N, "temperature": T, "top_p": P, "seed": S}
        -> {"event": "first"} as soon as the first token is out (for prompt tokens/s), then
           {"ok": true, "tokens": [...], "peak_memory": bytes, "active_memory": bytes}
    {"op": "score", "prompt": [...], "continuation": [...], "out": FILE.npy}
        -> {"ok": true, "shape": [len(continuation), vocab]}   (float32 logits saved to FILE)
    only with --reference (the locked reference pipeline, never a candidate):
    {"op": "forward", "tokens": [...], "start": K, "out": FILE.npy}
        -> {"ok": true, "shape": [...]}   full-sequence logits of positions K.. (one pass)
    {"op": "verify", "prompt": [...], "tokens": [...], "temperature": T, "top_p": P, "seed": S,
     "tolerance": {...}}
        -> {"ok": true, "report": {...}}   spec.check_stream on teacher-forced logits

A failure answers {"ok": false, "error": "..."}; the worker then carries on with the next request.
At start it sends {"event": "ready", ...} once load() returned, or {"event": "error", ...}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
import traceback

ERROR_TAIL = 4000


def _die_with_parent() -> None:
    """Linux: SIGKILL when the harness process dies, so that a hung pipeline never outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _private_protocol_channel():
    """A private duplicate of stdout for the protocol; fd 1 and sys.stdout go to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.set_inheritable(fd, False)
    return fd


def _import_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Channel:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, message: dict) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def _error() -> dict:
    """The exception being handled: its one-line summary first, then the traceback's tail."""
    kind, value, _ = sys.exc_info()
    summary = traceback.format_exception_only(kind, value)[-1].strip()
    return {"error": summary[-ERROR_TAIL:], "traceback": traceback.format_exc()[-ERROR_TAIL:]}


class Server:
    def __init__(self, pipeline, state, channel: Channel, reference_tools=None):
        self.pipeline, self.state, self.channel = pipeline, state, channel
        self.reference_tools = reference_tools

    def serve(self) -> None:
        for line in sys.stdin.buffer:
            try:
                request = json.loads(line)
                rid = request["id"]
            except (ValueError, KeyError, TypeError):
                self.channel.send({"id": None, "ok": False, "error": f"malformed request {line[:200]!r}"})
                continue
            op = request.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
            else:
                try:
                    answer = handler(request)
                except Exception:
                    answer = {"ok": False, **_error()}
            self.channel.send({"id": rid, **answer})

    def op_generate(self, r: dict) -> dict:
        import mlx.core as mx

        mx.reset_peak_memory()
        limit = int(r["max_tokens"])
        tokens: list[int] = []
        for token in self.pipeline.generate(self.state, list(r["prompt"]), limit, float(r["temperature"]),
                                            float(r["top_p"]), int(r["seed"])):
            if not tokens:
                self.channel.send({"id": r["id"], "event": "first"})
            tokens.append(int(token))
            if len(tokens) > limit:  # an endless generator: the driver counts and fails it
                break
        return {"ok": True, "tokens": tokens, "peak_memory": int(mx.get_peak_memory()),
                "active_memory": int(mx.get_active_memory())}

    def op_score(self, r: dict) -> dict:
        logits = self.pipeline.score(self.state, list(r["prompt"]), list(r["continuation"]))
        return {"ok": True, "shape": _save_float32(r["out"], logits)}

    def op_forward(self, r: dict) -> dict:
        tools = self._reference_only()
        return {"ok": True, "shape": _save_float32(r["out"], tools.forward(self.state, r["tokens"], int(r["start"])))}

    def op_verify(self, r: dict) -> dict:
        tools = self._reference_only()
        report = tools.verify(self.state, list(r["prompt"]), list(r["tokens"]), float(r["temperature"]),
                              float(r["top_p"]), int(r["seed"]), r["tolerance"])
        return {"ok": True, "report": report}

    def _reference_only(self):
        if self.reference_tools is None:
            raise PermissionError("this op is served by the reference worker only")
        return self.reference_tools


def _save_float32(path: str, array) -> list[int]:
    import mlx.core as mx
    import numpy as np

    if isinstance(array, mx.array):
        array = np.array(array.astype(mx.float32))
    array = np.asarray(array, dtype=np.float32)
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return list(array.shape)


class ReferenceTools:
    """What only the reference worker does: full-sequence logits of the reference model, and the
    sampler check of spec.py on them. Runs locked code only (reference.py, spec.py, this file)."""

    def __init__(self, spec):
        self.spec = spec

    @staticmethod
    def forward(model, tokens: list[int], start: int):
        import mlx.core as mx

        logits = model(mx.array(tokens, dtype=mx.int32)[None])[0, start:].astype(mx.float32)
        mx.eval(logits)
        return logits

    def verify(self, model, prompt, tokens, temperature, top_p, seed, tolerance) -> dict:
        import mlx.core as mx
        import numpy as np

        if not tokens:
            return self.spec.check_stream(np.zeros((0, 1), np.float32), None, [], temperature, top_p,
                                          **tolerance)
        # The logits that predicted each generated token: positions len(prompt)-1 ... end-1.
        logits = np.array(self.forward(model, prompt + tokens[:-1], len(prompt) - 1))
        vocab = logits.shape[-1]
        noise = None
        if temperature > 0:
            noise = np.array(self.spec.noise(mx, seed, len(tokens), vocab))
        return self.spec.check_stream(logits, noise, tokens, temperature, top_p, **tolerance)


def main(argv=None) -> int:
    _die_with_parent()
    channel = Channel(_private_protocol_channel())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inference", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--reference", action="store_true")
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    # An MLX worker has no torch, as on the Macs MLX is for: mlx_lm's tokenizer utilities import
    # transformers, which imports torch whenever it is installed (the lab's CUDA extra) and then
    # costs every worker ~2 s of CPU for nothing MLX runs. None in sys.modules makes `import torch`
    # a ModuleNotFoundError and transformers' find_spec probe say "absent" (interface.md says so).
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import mlx.core as mx

        tools = ReferenceTools(_import_file("lab_mlx_spec", os.path.join(here, "spec.py"))) if args.reference else None
        t0 = time.perf_counter()
        pipeline = _import_file("inference", args.inference)
        state = pipeline.load(args.model)
        seconds = time.perf_counter() - t0
    except BaseException:
        channel.send({"event": "error", **_error()})
        return 1
    channel.send({"event": "ready", "load_seconds": seconds, "mlx": mx.__version__,
                  "device": str(mx.default_device()), "pid": os.getpid()})
    Server(pipeline, state, channel, tools).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
