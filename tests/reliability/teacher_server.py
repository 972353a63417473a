"""A real OpenAI-compatible teacher on loopback that can misbehave on purpose.

`FakeTeacher(mode)` serves /v1/chat/completions from a thread (stdlib http.server). In mode "ok"
it answers like a sane teacher: as a pointwise judge it gives "Score: 9" to an answer containing a
digit and "Score: 2" otherwise (so it agrees with the tiny policy's regex verifier and passes the
anchor check), and as a labeller it answers "The answer is 7". Other modes:

    down       the connection is reset before any answer (a dead server)
    slow       answers after `slow_s` seconds (beyond the client's timeout)
    429, 500   that status, with a JSON error body (429 carries Retry-After: 0)
    malformed  200 with a body that is not JSON
    truncated  200 whose Content-Length promises more than is sent, then the socket closes
    garbage    200 with valid JSON that is not a completion ({"choices": "nope"})
    echo401    401 whose body echoes the request's Authorization header (a hostile or careless
               server handing the key back, to see whether it reaches an error message)
    chaos      every other request is one of the faults above, in turn; the rest are "ok"
    biased     "ok", except that as a pairwise judge it always picks the first answer (position bias)

As a pairwise judge ("ok") it prefers the answer with a digit, then the longer one, in either order.

Every request's Authorization header is recorded in `auth_seen`, so a test can prove the key was
really sent (and so really had a chance to leak).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ["down", "slow", "429", "500", "malformed", "truncated", "garbage", "echo401"]
ANSWER_BLOCK = re.compile(r"\[ANSWER (\w+)\]\n(.*?)\n\[END ANSWER \1\]", re.S)
PAIR_BLOCKS = re.compile(r"\[ANSWER ([AB]) (\w+)\]\n(.*?)\n\[END ANSWER \1 \2\]", re.S)


def sane_reply(messages: list[dict], biased: bool = False) -> str:
    text = messages[-1]["content"] if messages else ""
    pair = PAIR_BLOCKS.findall(text)
    if pair:  # a pairwise judge prompt: the answer with a digit wins, then the longer (whatever the order)
        if biased:
            return "Verdict: A"
        (_, _, a), (_, _, b) = pair[:2]
        key = lambda t: (bool(re.search(r"[0-9]", t)), len(t), t)  # noqa: E731
        return "Verdict: A" if key(a) >= key(b) else "Verdict: B"
    m = ANSWER_BLOCK.search(text)
    if m:  # a pointwise judge prompt
        return "Score: 9" if re.search(r"[0-9]", m.group(2)) else "Score: 2"
    return "The answer is 7"


class FakeTeacher:
    def __init__(self, mode: str = "ok", slow_s: float = 2.0):
        self.mode = mode
        self.slow_s = slow_s
        self.auth_seen: list[str] = []
        self.served: dict[str, int] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet: the test reads counters, not access logs
                pass

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                with outer._lock:
                    outer.auth_seen.append(self.headers.get("authorization", ""))
                    mode = outer.mode
                    if mode == "chaos":
                        # every other request a fault, in turn, so that each kind is served
                        k = outer._count = getattr(outer, "_count", -1) + 1
                        mode = FAULTS[(k // 2) % len(FAULTS)] if k % 2 == 0 else "ok"
                    outer.served[mode] = outer.served.get(mode, 0) + 1
                outer._answer(self, mode, body, self.headers.get("authorization", ""))

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients that gave up (timeouts) break pipes on purpose: not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-teacher", daemon=True)

    def __enter__(self) -> "FakeTeacher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, mode: str, body: dict, auth: str) -> None:
        def send(status: int, payload: bytes, headers: dict | None = None, length: int | None = None) -> None:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload) if length is None else length))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()

        if mode == "down":
            # RST instead of an answer: what a crashed server's port looks like mid-request
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.close_connection = True
            h.connection.close()
            return
        if mode == "slow":
            time.sleep(self.slow_s)
        if mode in ("429", "500"):
            send(int(mode), json.dumps({"error": {"message": f"fake {mode}"}}).encode(), {"Retry-After": "0"})
            return
        if mode == "echo401":
            send(401, json.dumps({"error": {"message": f"invalid key in header: {auth}"}}).encode())
            return
        if mode == "malformed":
            send(200, b"{this is not json")
            return
        if mode == "truncated":
            send(200, b'{"choices": [{"message": {"content": "Sc', length=4096)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "garbage":
            send(200, json.dumps({"choices": "nope", "usage": {}}).encode())
            return
        n = int(body.get("n") or 1)
        text = sane_reply(body.get("messages") or [], biased=mode == "biased")
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                    "logprobs": {"content": [{"token": "x", "logprob": -0.1}] * 3}} for i in range(n)]
        send(200, json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"), "choices": choices,
                              "usage": {"prompt_tokens": 10, "completion_tokens": 3 * n, "total_tokens": 10 + 3 * n}}).encode())


def teacher_toml(base_url: str, *, key_env: str | None = "SD_TEST_TEACHER_KEY", key_file: str | None = None,
                 judge: bool = True, label: bool = True, timeout_s: float = 1.0) -> str:
    """Policy text for a teacher at `base_url` with fast retries and a quick circuit breaker."""
    key = f'api_key_env = "{key_env}"' if key_env else f'api_key_file = "{key_file}"'
    return f"""
[teacher]
kind = "openai"
max_tokens = 16
[teacher.endpoint]
base_url = "{base_url}"
model = "fake-teacher"
{key}
concurrency = 2
timeout_s = {timeout_s}
max_retries = 1
backoff_s = 0.05
circuit_breaker_failures = 4
circuit_breaker_cooldown_s = 0.5
"""
