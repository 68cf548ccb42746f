"""EC2's instance metadata service (IMDSv2) on 127.0.0.1, as far as the spot watcher reads it:
a session token, and the spot instance-action notice once the test posts one."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from simpsons.cluster import free_port

NOTICE_TIME = "2026-12-06T18:22:00Z"


class FakeImds:
    """EC2's metadata endpoints that the watcher uses, on a free loopback port."""

    def __init__(self):
        self.notice: dict | None = None
        self.tokens: list[str] = []  # issued, the last one valid
        self.requests: list[tuple] = []  # (method, path, headers: case-insensitive)
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                imds.requests.append(("PUT", self.path, self.headers))
                if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
                    return self._reply(400, b"")
                imds.tokens.append(f"token-{len(imds.tokens)}")
                self._reply(200, imds.tokens[-1].encode())

            def do_GET(self):
                imds.requests.append(("GET", self.path, self.headers))
                if not imds.tokens or self.headers.get("X-aws-ec2-metadata-token") != imds.tokens[-1]:
                    return self._reply(401, b"")
                if self.path != "/latest/meta-data/spot/instance-action" or imds.notice is None:
                    return self._reply(404, b"Not Found")
                self._reply(200, json.dumps(imds.notice).encode())

            def _reply(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeImds:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
