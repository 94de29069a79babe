#!/usr/bin/env python3
"""Time from process start to ready: spawns `BIN --config CFG` N times (on a fresh port each time,
via TOKENGATE_SERVER__LISTEN), polls GET /readyz every 5 ms, and prints one JSON line:
{"ready_ms": [...], "listen_ms": [...]} (listen = first accepted TCP connection)."""
import json
import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port):
    """HTTP status of GET /readyz, None when nothing listens yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
            return int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else -1
    except OSError:
        return None


def once(binary, cfg, log):
    port = free_port()
    env = dict(os.environ, TOKENGATE_SERVER__LISTEN=f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "--config", cfg], env=env, stdout=log, stderr=log)
    listen = ready = None
    try:
        deadline = t0 + 10
        while time.perf_counter() < deadline and p.poll() is None:
            st = status(port)
            now = time.perf_counter()
            if st is not None and listen is None:
                listen = (now - t0) * 1000
            if st == 200:
                ready = (now - t0) * 1000
                break
            time.sleep(0.005)
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return listen, ready


def main():
    binary, cfg, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"ready_ms": [], "listen_ms": []}
    with open(sys.argv[4] if len(sys.argv) > 4 else os.devnull, "ab") as log:
        for _ in range(n):
            listen, ready = once(binary, cfg, log)
            out["listen_ms"].append(None if listen is None else round(listen, 1))
            out["ready_ms"].append(None if ready is None else round(ready, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
