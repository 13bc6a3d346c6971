"""A local stand-in for the Anthropic Messages API, enough to drive the real `anthropic` SDK.

    with FakeAnthropic([reply(tool_use("editor", {...})), error(529), reply(text("done"))]) as api:
        client = anthropic.Anthropic(base_url=api.url, api_key="test-key")

Each POST /v1/messages takes the next entry of the script: a message (`reply`) or an HTTP error
(`error`). Every request is recorded (headers and JSON body) in `api.requests`, so tests can
assert what the agent sent: cache_control, tool results, that no retry happened.
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ids = itertools.count(1)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def tool_use(name: str, input: dict, id: str | None = None) -> dict:
    return {"type": "tool_use", "id": id or f"toolu_{next(_ids):04d}", "name": name, "input": input}


def reply(*blocks: dict, usage: dict | None = None, stop_reason: str | None = None) -> dict:
    """One assistant message; stop_reason defaults to tool_use when a block is a tool call."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {"kind": "message", "content": list(blocks), "stop_reason": stop_reason,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, **(usage or {})}}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def error(status: int, message: str = "", type: str | None = None) -> dict:
    """An HTTP error as the API sends it; retry-after is ~0 so the SDK's retries are instant."""
    return {"kind": "error", "status": status,
            "body": {"type": "error", "error": {"type": type or ERROR_TYPES.get(status, "api_error"),
                                                "message": message or f"error {status}"}}}


class FakeAnthropic:
    def __init__(self, script: list[dict]):
        self.script = list(script)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                    entry = fake.script.pop(0) if fake.script else error(
                        400, "the fake API's script is exhausted")
                if self.path.split("?")[0] != "/v1/messages":
                    entry = error(404, f"no route {self.path}")
                if entry["kind"] == "error":
                    self._send(entry["status"], entry["body"],
                               {"retry-after": "0", "retry-after-ms": "1", "x-should-retry":
                                "true" if entry["status"] in (408, 409, 429) or entry["status"] >= 500 else "false"})
                    return
                self._send(200, {
                    "id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant",
                    "model": body.get("model", ""), "content": entry["content"],
                    "stop_reason": entry["stop_reason"], "stop_sequence": None, "usage": entry["usage"],
                }, {"request-id": "req_fake"})

            def _send(self, status: int, payload: dict, headers: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

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
