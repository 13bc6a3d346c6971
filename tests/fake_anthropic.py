"""A local stand-in for the Anthropic Messages API, enough to drive the real `anthropic` SDK,
streaming included, with the faults a night on the real API brings.

    with FakeAnthropic([reply(tool_use("editor", {...})), error(529), reply(text("done"))]) as api:
        client = anthropic.Anthropic(base_url=api.url, api_key="test-key")

Each POST /v1/messages takes the next entry of the script (or asks the script, when it is a
callable `script(body, index) -> entry`, for a soak test's endless episodes):

- `reply(*blocks, stop_reason=..., usage=..., slow_s=...)`: a message; streamed as server-sent
  events when the request asks for a stream (block by block, in small deltas; `slow_s` between
  events is added to the fake clock, so a slow stream costs no real time);
- `error(status, retry_after=..., headers=...)`: an HTTP error as the API sends it (529
  overloaded, 429 with retry-after and the rate-limit headers, 401, 400, ...);
- `stream_error(type)`: a stream that starts and then sends an `error` event (overloaded mid-stream);
- `stall(seconds)`: a stream that starts and then says nothing for `seconds` of real time (a
  read timeout on the client's side).

A reply whose usage is not given gets one estimated from the request (4 characters a token; the
prefix shared with an earlier request counts as a cache read, the rest as a cache write), which is
how docs/agent.md's token sizes per episode are measured. Every request is recorded (headers and
JSON body) in `api.requests`; `api.faults` counts the faults served by kind.

`FakeClock` is a compressed clock for `lab.agents.clock.use`: its sleep() returns at once and
moves its time on; `latency_s` moves it on by that much per request (a model's thinking time).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ids = itertools.count(1)
CHARS_PER_TOKEN = 4


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def thinking(t: str) -> dict:
    return {"type": "thinking", "thinking": t, "signature": "sig-fake"}


def tool_use(name: str, input, id: str | None = None) -> dict:
    return {"type": "tool_use", "id": id or f"toolu_{next(_ids):04d}", "name": name, "input": input}


def reply(*blocks: dict, usage: dict | None = None, stop_reason: str | None = None, slow_s: float = 0.0,
          partial_json: str | None = None) -> dict:
    """One assistant message; stop_reason defaults to tool_use when a block is a tool call.
    `partial_json` replaces the streamed input of the last tool call (a truncated answer)."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {"kind": "message", "content": list(blocks), "stop_reason": stop_reason, "slow_s": slow_s,
            "partial_json": partial_json,
            "usage": None if usage is None else {"input_tokens": 10, "output_tokens": 5,
                                                 "cache_creation_input_tokens": 0,
                                                 "cache_read_input_tokens": 0, **usage}}


def fixed(entry: dict) -> dict:
    """`entry` with the small fixed usage of the old fake (10 in, 5 out) instead of an estimate."""
    if entry.get("kind") == "message" and entry.get("usage") is None:
        entry = {**entry, "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 0}}
    return entry


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def error(status: int, message: str = "", type: str | None = None, retry_after: float | None = 0.0,
          headers: dict | None = None) -> dict:
    """An HTTP error as the API sends it. retry_after (seconds; None: no header) is what a
    client honours; 0 makes retries instant."""
    hdrs = {"x-should-retry": "true" if status in (408, 409, 429) or status >= 500 else "false"}
    if retry_after is not None:
        hdrs["retry-after"] = f"{retry_after:g}"
    hdrs.update(headers or {})
    return {"kind": "error", "status": status, "headers": hdrs,
            "body": {"type": "error", "error": {"type": type or ERROR_TYPES.get(status, "api_error"),
                                                "message": message or f"error {status}"}}}


def stream_error(type: str = "overloaded_error", message: str = "Overloaded") -> dict:
    return {"kind": "stream_error", "body": {"type": "error", "error": {"type": type, "message": message}}}


def stall(seconds: float) -> dict:
    return {"kind": "stall", "seconds": seconds}


class FakeClock:
    """A compressed clock: now() runs with real time plus everything slept; sleep() is instant."""

    def __init__(self):
        self.offset = 0.0
        self.slept = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        with self._lock:
            self.slept += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.offset += max(seconds, 0.0)


def _tokens(chars: int) -> int:
    return max(1, chars // CHARS_PER_TOKEN)


class FakeAnthropic:
    def __init__(self, script, clock: FakeClock | None = None, latency_s: float = 0.0):
        self.script = script if callable(script) else list(script)
        self.clock = clock
        self.latency_s = latency_s
        self.requests: list[dict] = []
        self.faults: Counter = Counter()
        self.usages: list[dict] = []  # the usage of every message served
        self._prefixes: list[str] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                # many small writes (one per event): without this, Nagle's algorithm and the
                # client's delayed ACKs hold each stream for tens of milliseconds
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    index = len(fake.requests)
                    fake.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                    if callable(fake.script):
                        entry = fake.script(body, index)
                    else:
                        entry = fake.script.pop(0) if fake.script else error(
                            400, "the fake API's script is exhausted")
                    if fake.clock is not None and fake.latency_s:
                        fake.clock.advance(fake.latency_s)
                if self.path.split("?")[0] != "/v1/messages":
                    entry = error(404, f"no route {self.path}")
                kind = entry["kind"]
                if kind == "error":
                    fake.faults[f"http_{entry['status']}"] += 1
                    self._send(entry["status"], entry["body"], entry["headers"])
                    return
                message = {"id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant",
                           "model": body.get("model", ""), "content": [], "stop_reason": None,
                           "stop_sequence": None, "usage": fake._estimate(body, entry)}
                if kind == "message":
                    message.update(content=entry["content"], stop_reason=entry["stop_reason"])
                    with fake._lock:
                        fake.usages.append(dict(message["usage"]))
                        if entry["stop_reason"] in ("max_tokens", "refusal"):
                            fake.faults[entry["stop_reason"]] += 1
                if not body.get("stream"):
                    if kind != "message":
                        fake.faults[kind] += 1
                        self._send(529, stream_error()["body"], {"x-should-retry": "true"})
                        return
                    self._send(200, message, {"request-id": "req_fake"})
                    return
                self._stream(message, entry)

            def _send(self, status: int, payload: dict, headers: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("connection", "close")  # no reuse of a connection the server is closing
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def _event(self, name: str, data: dict, slow_s: float = 0.0):
                if slow_s and fake.clock is not None:
                    fake.clock.advance(slow_s)
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()

            def _stream(self, message: dict, entry: dict):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.send_header("connection", "close")
                self.send_header("request-id", "req_fake")
                self.end_headers()
                slow = entry.get("slow_s", 0.0)
                try:
                    usage = dict(message["usage"])
                    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
                    self._event("message_start", {"type": "message_start", "message": start}, slow)
                    if entry["kind"] == "stream_error":
                        fake.faults["stream_error"] += 1
                        self._event("error", entry["body"])
                        return
                    if entry["kind"] == "stall":
                        fake.faults["stall"] += 1
                        time.sleep(entry["seconds"])
                        return
                    blocks = message["content"]
                    for i, block in enumerate(blocks):
                        self._block(i, block, slow, entry.get("partial_json") if i == len(blocks) - 1 else None)
                    self._event("message_delta", {"type": "message_delta",
                                                  "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                                  "usage": {"output_tokens": usage["output_tokens"]}}, slow)
                    self._event("message_stop", {"type": "message_stop"})
                except (BrokenPipeError, ConnectionResetError):
                    return
                finally:
                    try:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    except OSError:
                        pass
                    self.close_connection = True

            def _block(self, i: int, block: dict, slow: float, partial_json: str | None):
                t = block["type"]
                if t == "text":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "text", "text": ""}}, slow)
                    for piece in _pieces(block["text"]):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "text_delta", "text": piece}}, slow)
                elif t == "thinking":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "thinking", "thinking": "",
                                                                          "signature": ""}}, slow)
                    for piece in _pieces(block["thinking"]):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "thinking_delta", "thinking": piece}}, slow)
                    self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                        "delta": {"type": "signature_delta",
                                                                  "signature": block.get("signature", "sig")}})
                elif t == "tool_use":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "tool_use", "id": block["id"],
                                                                          "name": block["name"], "input": {}}}, slow)
                    raw = partial_json if partial_json is not None else json.dumps(block["input"])
                    for piece in _pieces(raw):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "input_json_delta", "partial_json": piece}}, slow)
                self._event("content_block_stop", {"type": "content_block_stop", "index": i})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def _estimate(self, body: dict, entry: dict) -> dict:
        """The entry's usage, or one estimated from the request: the prefix shared with an earlier
        request is read from the cache, the rest written to it (the agent puts a breakpoint on the
        last user turn), and the output is the size of the reply."""
        if entry.get("usage"):
            return dict(entry["usage"])
        # cache_control marks where a prefix may be cached; it is no part of the prefix itself
        prompt = json.dumps(_unmarked([body.get("tools"), body.get("system"), body.get("messages")]), sort_keys=True)
        with self._lock:
            shared = max((_common(prompt, p) for p in self._prefixes[-8:]), default=0)
            self._prefixes.append(prompt)
        output = sum(len(json.dumps(b)) for b in entry.get("content", []))
        return {"input_tokens": 3, "output_tokens": _tokens(output),
                "cache_creation_input_tokens": _tokens(len(prompt) - shared) if len(prompt) > shared else 0,
                "cache_read_input_tokens": _tokens(shared) if shared else 0}

    def __enter__(self) -> "FakeAnthropic":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        return False

    @property
    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.requests]


def _unmarked(value):
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on the longest common prefix
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pieces(s: str, size: int = 400):
    return [s[i:i + size] for i in range(0, len(s), size)] or [""]
