"""N `GET /api/data` calls on one keep-alive connection to tokengate (bench/instructions.sh).

    python3 bench/keepalive_load.py PORT N COOKIE

Prints `bad K`: how many answers were not 200.
"""
import http.client
import sys

port, n, cookie = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
bad = 0
for _ in range(n):
    c.request("GET", "/api/data", headers={"Cookie": cookie, "X-CSRF": "1"})
    r = c.getresponse()
    r.read()
    if r.status != 200:
        bad += 1
print("bad", bad)
