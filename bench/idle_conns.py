"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one `GET PATH` on each and reads its
answer, then holds them all idle for HOLD seconds (bench/run.sh measures the proxy's memory
meanwhile).

    python3 bench/idle_conns.py PORT N HOLD PATH [HEADER: value ...]

Prints `ready OK BAD` once every answer is in (OK: 2xx answers), then `done` when it lets go.
"""
import socket
import sys
import time

port, n, hold, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
extra = "".join(f"{h}\r\n" for h in sys.argv[5:])
request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


def answer(s):
    """Reads one answer (Content-Length framed, as both proxies answer this call); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ", 2)[1])


conns = []
ok = bad = 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(request)
    conns.append(s)
for s in conns:
    if 200 <= answer(s) < 300:
        ok += 1
    else:
        bad += 1
print("ready", ok, bad, flush=True)
time.sleep(hold)
print("done", flush=True)
