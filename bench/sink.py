#!/usr/bin/env python3
"""Upload sink for bench/run.sh: reads every request body in 1 MiB chunks and discards it
(Content-Length or chunked), then answers {"bytes": N}. 401 without an Authorization header
(after draining the body). Listens on 127.0.0.1:PORT (argv[1]); prints {"port": N} when ready."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _drain(self):
        n = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    got = self.rfile.read(min(CHUNK, left))
                    if not got:
                        raise ConnectionError("body ended early")
                    left -= len(got)
                    n += len(got)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                got = self.rfile.read(min(CHUNK, left))
                if not got:
                    raise ConnectionError("body ended early")
                left -= len(got)
                n += len(got)
        return n

    def _answer(self):
        n = self._drain()
        ok = bool(self.headers.get("Authorization"))
        body = json.dumps({"bytes": n} if ok else {"error": "missing_token"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_GET = _answer


if __name__ == "__main__":
    srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), Sink)
    srv.daemon_threads = True
    print(json.dumps({"port": srv.server_address[1]}), flush=True)
    srv.serve_forever()
