"""A small OpenAI-compatible server on loopback (stdlib http.server) whose next answers can be
scripted to fail: 503, 429, a hang, garbage JSON, a closed connection, a truncated body, a 4xx."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self):
        self.script: list[str] = []  # behaviours for the next requests; then "ok"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    what = fake.script.pop(0) if fake.script else "ok"
                fake.answer(self, what, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, h: BaseHTTPRequestHandler, what: str, body: dict) -> None:
        if what == "hang":
            time.sleep(3)
            return self._send(h, 200, self._ok(body))
        if what == "close":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if what == "garbage":
            return self._send(h, 200, b"{not json")
        if what == "truncated":
            data = self._ok(body)
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if what.isdigit():
            headers = {"retry-after": "0"} if what in ("429", "503") else {}
            # a careless server echoes the credentials it got: the engine must not pass them on
            auth = h.headers.get("authorization", "")
            msg = json.dumps({"error": {"message": f"scripted {what} for {auth}"}}).encode()
            return self._send(h, int(what), msg, headers)
        return self._send(h, 200, self._ok(body))

    @staticmethod
    def _send(h, code: int, data: bytes, headers: dict | None = None) -> None:
        h.send_response(code)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _ok(body: dict) -> bytes:
        n = body.get("n", 1)
        words = ["alpha", "beta", "gamma"]
        choices = []
        for i in range(n):
            text = " ".join(words[: i + 1])
            lp = [{"token": w, "logprob": -0.5} for w in words[: i + 1]]
            if "messages" in body:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                                "logprobs": {"content": lp} if body.get("logprobs") else None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": "length",
                                "logprobs": {"token_logprobs": [-0.5] * (i + 1)} if body.get("logprobs") is not None else None})
        usage = {"prompt_tokens": 7, "completion_tokens": sum(range(1, n + 1))}
        return json.dumps({"id": "x", "object": "chat.completion", "choices": choices, "usage": usage}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
