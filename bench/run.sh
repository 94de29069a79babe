#!/usr/bin/env bash
# bench/run.sh — the side-by-side benchmark of docs/benchmarks.md, in one command:
#
#   bench/run.sh
#
# On this machine, in one run: builds tokengate (release), starts an upstream API (nginx, a small
# JSON body at /api/ that requires Authorization), an nginx plain reverse proxy in front of it
# (adds a static bearer token: the near-ideal proxy), the real IdP (tests/idp/idp.mjs) and
# tokengate; logs in once through tokengate with curl; loads the targets in rounds A B C A B C
# with wrk (keep-alive, fixed connection counts and durations):
#   A  direct to the upstream (with an Authorization header)
#   B  nginx plain proxy
#   C  tokengate, cookie session store (Cookie + X-CSRF headers)
#   D  tokengate, redis session store (only when the binary supports it: see below)
#   E  tokengate, redis session store with the per-replica cache (session.redis_cache_ms)
# then measures 1 GiB up/download through tokengate, start-to-ready time and the refresh
# stampede; writes bench/results/latest.md (and prints it). Every process it starts is stopped
# on exit, also on failure or Ctrl-C.
#
# Needs: cargo, nginx (Debian nginx-light is enough), wrk, node 20 + npm, curl, python3.
#   apt-get install -y nginx-light wrk
# Knobs (environment): ROUNDS=3 DURATION=10 (s per wrk run) WARMUP=3 CONNS="1 32 256"
#   BIG=1G STARTS=7 STAMPEDE_N=50 IDLE_CONNS=2000 STAMPEDE_TTL=4 OUT=bench/results/latest.md SKIP_BUILD=0
#   REDIS_CACHE_MS=5000 (target E's session.redis_cache_ms)
#   KEEP_WORK=1 (keep the temp dir with every log and raw result)
#   PROFILE=1 (one extra tokengate run under `perf record`: bench/results/perf-tokengate.txt)
#   HOLD=1 (start the stack, log in, write $WORK/hold.env and wait: for profiling by hand)
#   TG_SERVER_EXTRA='workers = 1' (extra [server] lines in tokengate's config)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-"1 32 256"}
BIG=${BIG:-1G}
STARTS=${STARTS:-7}
STAMPEDE_N=${STAMPEDE_N:-50}
IDLE_CONNS=${IDLE_CONNS:-2000}
STAMPEDE_TTL=${STAMPEDE_TTL:-4}
OUT=${OUT:-$ROOT/bench/results/latest.md}
SKIP_BUILD=${SKIP_BUILD:-0}
REDIS_CACHE_MS=${REDIS_CACHE_MS:-5000}
BIN=${BIN:-$ROOT/target/release/tokengate}

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

for t in cargo nginx wrk node npm curl python3 awk; do
  command -v "$t" >/dev/null || die "needs $t (Debian: apt-get install -y nginx-light wrk curl)"
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d /tmp/tokengate-bench.XXXXXX)
chmod 755 "$WORK" # nginx workers may run as another user
PIDS=()
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ ${#PIDS[@]} -gt 0 ]; then
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
    # whatever has not stopped 5 s later is killed
    (
      sleep 5
      kill -KILL "${PIDS[@]}" 2>/dev/null
    ) &
    local killer=$!
    wait "${PIDS[@]}" 2>/dev/null
    kill "$killer" 2>/dev/null
    wait "$killer" 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] || [ "${KEEP_WORK:-0}" = 1 ]; then
    log "logs and raw results kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn NAME CMD...: background child with its output in $WORK/NAME.{out,err}; sets LAST_PID
spawn() {
  local name=$1
  shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
# wait_for SECONDS CMD...: retry CMD every 50 ms
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.05
  done
}
# first line of a child's stdout (its {"port":...} JSON), waiting for it
first_line() {
  local f=$WORK/$1.out deadline=$((SECONDS + 30))
  until [ -s "$f" ] && head -1 "$f" | grep -q '}'; do
    [ $SECONDS -lt $deadline ] || die "$1 did not start: $(tail -5 "$WORK/$1.err" 2>/dev/null)"
    sleep 0.05
  done
  head -1 "$f"
}
json_num() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p"; }
free_ports() { # N free TCP ports on 127.0.0.1, held together while picked so they differ
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
rss_kb() { # summed VmRSS (or another field) of the given pids, in kB
  local field=${FIELD:-VmRSS} p s=0 v
  for p in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null)
    s=$((s + ${v:-0}))
  done
  echo "$s"
}
# rss_sampler OUTFILE INTERVAL PID...: keeps the peak summed VmRSS in OUTFILE until killed
rss_sampler() {
  local out=$1 iv=$2 max=0 s
  shift 2
  while :; do
    s=$(rss_kb "$@")
    if [ "$s" -gt "$max" ]; then
      max=$s
      echo "$max" >"$out"
    fi
    sleep "$iv"
  done
}
start_sampler() { # NAME INTERVAL PID... ; sets SAMPLER_PID
  rss_sampler "$WORK/rss-$1" "$2" "${@:3}" &
  SAMPLER_PID=$!
  PIDS+=("$SAMPLER_PID")
}
stop_sampler() { kill "$1" 2>/dev/null || true; }
peak_of() { cat "$WORK/rss-$1" 2>/dev/null || echo 0; }
nginx_pids() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }
ctx_switches() { # voluntary + involuntary context switches of every thread of the given pids
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
    awk '/^(non)?voluntary_ctxt_switches:/ {s += $2} END {print s + 0}'
}
up_accepts() { curl -s --max-time 5 "http://127.0.0.1:$UP_PORT/__status" | awk 'NR == 3 {print $1}'; }
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # summed utime+stime of the given pids (all their threads), in clock ticks
  local p s=0 v
  for p in "$@"; do
    v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null)
    s=$((s + ${v:-0}))
  done
  echo "$s"
}

FACTS=$WORK/facts.env
fact() { printf '%s\t%s\n' "$1" "$2" | tr -d '\r' >>"$FACTS"; } # key<TAB>one-line value

# ---------------------------------------------------------------- machine, build
fact started "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact nproc "$(nproc)"
fact cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
fact mem "$(free -h | awk '/^Mem:/ {print $2}')"
fact kernel "$(uname -sr)"
fact load_before "$(cut -d' ' -f1-3 /proc/loadavg)"
fact commit "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty')"
fact nginx_version "$(nginx -v 2>&1 | sed 's/.*nginx\///')"
fact wrk_version "$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
fact node_version "$(node --version)"
fact settings "ROUNDS=$ROUNDS DURATION=${DURATION}s WARMUP=${WARMUP}s CONNS=\"$CONNS\" (wrk -t1, keep-alive); E: redis_cache_ms = $REDIS_CACHE_MS"

if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release"
  cargo build --release --quiet || die "cargo build --release"
fi
[ -x "$BIN" ] || die "$BIN missing"
if [ ! -d tests/idp/node_modules ]; then
  log "npm ci in tests/idp"
  (cd tests/idp && npm ci --no-audit --no-fund --silent) || die "npm ci"
fi

read -r UP_PORT NGX_PORT TG_PORT SINK_PORT TG2_PORT TGR_PORT REDIS_PORT TGE_PORT <<<"$(free_ports 8)"
KEY=$("$BIN" keygen)

# ---------------------------------------------------------------- upstream API (nginx)
mkdir -p "$WORK/up/tmp" "$WORK/ngx/tmp" "$WORK/www/api"
truncate -s "$BIG" "$WORK/www/api/big" # sparse: served from the page cache, no disk I/O
chmod -R a+rX "$WORK/www"
BIG_BYTES=$(stat -c %s "$WORK/www/api/big")
JSON='{"id":42,"name":"Widget","price":{"amount":1999,"currency":"EUR"},"tags":["a","b","c"],"in_stock":true,"updated":"2024-05-01T12:00:00Z"}'
nginx_common() { # DIR: the bits both nginx configs share
  cat <<EOF
daemon off;
worker_processes 2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 16384; }
EOF
}
nginx_http_common() {
  cat <<EOF
  access_log off;
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  sendfile on;
EOF
}
{
  nginx_common "$WORK/up"
  echo "http {"
  nginx_http_common "$WORK/up"
  cat <<EOF
  server {
    listen 127.0.0.1:$UP_PORT;
    default_type application/json;
    location /api/ {
      if (\$http_authorization = "") { return 401 '{"error":"missing_token"}\n'; }
      return 200 '$JSON\n';
    }
    location = /__status { stub_status; }  # accepted connections: is the proxy reusing them?
    location = /api/big {
      if (\$http_authorization = "") { return 401 '{"error":"missing_token"}\n'; }
      default_type application/octet-stream;
      root $WORK/www;
    }
  }
}
EOF
} >"$WORK/up/nginx.conf"
nginx -t -q -p "$WORK/up" -e "$WORK/up/error.log" -c "$WORK/up/nginx.conf" 2>"$WORK/nginx-test.err" ||
  die "upstream nginx config: $(cat "$WORK/nginx-test.err")"
spawn up nginx -p "$WORK/up" -e "$WORK/up/error.log" -c "$WORK/up/nginx.conf"
UP_PID=$LAST_PID

# ---------------------------------------------------------------- B: nginx plain proxy
{
  nginx_common "$WORK/ngx"
  echo "http {"
  nginx_http_common "$WORK/ngx"
  cat <<EOF
  upstream api {
    server 127.0.0.1:$UP_PORT;
    keepalive 512;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
  }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer x";
      proxy_max_temp_file_size 0;
    }
  }
}
EOF
} >"$WORK/ngx/nginx.conf"
spawn ngx nginx -p "$WORK/ngx" -e "$WORK/ngx/error.log" -c "$WORK/ngx/nginx.conf"
NGX_PID=$LAST_PID

# ---------------------------------------------------------------- upload sink
spawn sink python3 bench/sink.py "$SINK_PORT"
first_line sink >/dev/null

# ---------------------------------------------------------------- IdPs
idp_clients() { # redirect ports...
  local uris="" logout="" p
  for p in "$@"; do
    uris+="${uris:+,}\"http://127.0.0.1:$p/oauth-callback\""
    logout+="${logout:+,}\"http://127.0.0.1:$p/\""
  done
  printf '[{"client_id":"tokengate","client_secret":"bench-secret","redirect_uris":[%s],"post_logout_redirect_uris":[%s],"grant_types":["authorization_code","refresh_token"],"response_types":["code"],"token_endpoint_auth_method":"client_secret_basic"}]' "$uris" "$logout"
}
# main IdP: long-lived access tokens, so no refresh happens during the load runs
PORT=0 IDP_ACCESS_TOKEN_TTL=3600 IDP_CLIENTS=$(idp_clients "$TG_PORT" "$TGR_PORT" "$TGE_PORT") spawn idp node tests/idp/idp.mjs
IDP_PID=$LAST_PID
# stampede IdP: access tokens that expire after STAMPEDE_TTL seconds
PORT=0 IDP_ACCESS_TOKEN_TTL=$STAMPEDE_TTL IDP_CLIENTS=$(idp_clients "$TG2_PORT") spawn idp2 node tests/idp/idp.mjs
ISSUER=http://127.0.0.1:$(first_line idp | json_num port)
ISSUER2=http://127.0.0.1:$(first_line idp2 | json_num port)

# ---------------------------------------------------------------- tokengate
tg_config() { # FILE PORT ISSUER STORE [extra [oauth] lines] [extra [session] lines]
  cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
public_url = "http://127.0.0.1:$2"
static_dir = "$ROOT/static"
${TG_SERVER_EXTRA:-}

[oauth]
issuer = "$3"
client_id = "tokengate"
client_secret = "bench-secret"
scopes = ["openid", "profile", "email", "offline_access"]
extra_authorize_params = { prompt = "consent" }
${5:-}

[session]
store = "$4"
keys = ["$KEY"]
EOF
  if [ "$4" = redis ]; then echo "redis_url = \"redis://127.0.0.1:$REDIS_PORT\"" >>"$1"; fi
  if [ -n "${6:-}" ]; then echo "$6" >>"$1"; fi
  cat >>"$1" <<EOF

[[routes]]
prefix = "/api"
upstream = "http://127.0.0.1:$UP_PORT"

[[routes]]
prefix = "/sink"
upstream = "http://127.0.0.1:$SINK_PORT"

[log]
level = "warn"
EOF
}
ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1/readyz")" = 200 ]; }
tg_config "$WORK/tg.toml" "$TG_PORT" "$ISSUER" cookie
"$BIN" check --config "$WORK/tg.toml" >"$WORK/check.out" 2>&1 || die "tokengate check: $(cat "$WORK/check.out")"
spawn tg "$BIN" --config "$WORK/tg.toml"
TG_PID=$LAST_PID
TG=http://127.0.0.1:$TG_PORT

wait_for 20 curl -sf --max-time 1 "http://127.0.0.1:$UP_PORT/api/x" -H 'Authorization: Bearer x' || die "upstream nginx: $(cat "$WORK/up/error.log")"
wait_for 20 curl -sf --max-time 1 "http://127.0.0.1:$NGX_PORT/api/x" || die "nginx proxy: $(cat "$WORK/ngx/error.log")"
wait_for 30 ready "$TG" || die "tokengate not ready: $(tail -5 "$WORK/tg.err")"
log "up: upstream :$UP_PORT, nginx proxy :$NGX_PORT, tokengate :$TG_PORT, IdP $ISSUER, sink :$SINK_PORT"

# ---------------------------------------------------------------- login through tokengate
# tg_login BASE ISSUER JAR: GET /login -> IdP login + consent pages -> /oauth-callback, with curl
# and one cookie jar (tests/idp/README.md). Afterwards the jar holds the session cookie.
creq() { # OUT curl-args...: no redirects followed; prints the status
  local out=$1
  shift
  curl -sS --max-time 10 -o "$out.body" -D "$out.head" -w '%{http_code}' -c "$JAR" -b "$JAR" "$@"
}
location() { sed -n 's/^[Ll]ocation: *//p' "$1.head" | tr -d '\r'; }
tg_login() {
  local base=$1 issuer=$2 d=$WORK/login st loc action prompt i
  JAR=$3
  mkdir -p "$d"
  st=$(creq "$d/0" "$base/login?return_to=/")
  [ "$st" = 302 ] || die "GET /login answered $st: $(cat "$d/0.body")"
  loc=$(location "$d/0")
  for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
    case $loc in
      "$base/oauth-callback"*)
        st=$(creq "$d/cb" "$loc")
        [ "$st" = 302 ] || die "callback answered $st: $(cat "$d/cb.body")"
        return 0
        ;;
      /*) loc=$issuer$loc ;;
    esac
    st=$(creq "$d/$i" "$loc")
    case $st in
      302 | 303) loc=$(location "$d/$i") ;;
      200)
        action=$(grep -o '<form [^>]*action="[^"]*"' "$d/$i.body" | head -1 | sed 's/.*action="//;s/"$//')
        prompt=$(grep -o 'name="prompt" value="[^"]*"' "$d/$i.body" | head -1 | sed 's/.*value="//;s/"$//')
        case $prompt in
          login) st=$(creq "$d/p$i" -X POST -d prompt=login -d login=alice -d password=bench "$action") ;;
          consent) st=$(creq "$d/p$i" -X POST -d prompt=consent "$action") ;;
          *) die "unexpected IdP page at $loc" ;;
        esac
        loc=$(location "$d/p$i")
        ;;
      *) die "IdP answered $st at $loc" ;;
    esac
  done
  die "login did not reach the callback"
}
# the session cookie(s) in a jar as a Cookie header value (tokengate's cookies only)
session_cookie() {
  awk -F'\t' 'NF >= 7 && $6 ~ /^(__Host-)?tg_session(\.[0-9]+)?$/ && $7 != "" {print $6 "=" $7}' "$1" |
    sort | paste -sd';' - | sed 's/;/; /g'
}
login_cookie() { # BASE ISSUER NAME -> prints the Cookie header value of a fresh session
  rm -f "$WORK/$3.jar"
  tg_login "$1" "$2" "$WORK/$3.jar"
  local c
  c=$(session_cookie "$WORK/$3.jar")
  [ -n "$c" ] || die "no session cookie after login ($3)"
  printf '%s' "$c"
}
code() { curl -s -o /dev/null --max-time 10 -w '%{http_code}' "$@"; }

COOKIE=$(login_cookie "$TG" "$ISSUER" main)
fact session_cookie_bytes "${#COOKIE}"
[ "$(code "http://127.0.0.1:$UP_PORT/api/data")" = 401 ] || die "upstream must answer 401 without Authorization"
[ "$(code -H 'Authorization: Bearer x' "http://127.0.0.1:$UP_PORT/api/data")" = 200 ] || die "A: direct"
[ "$(code "http://127.0.0.1:$NGX_PORT/api/data")" = 200 ] || die "B: nginx proxy"
[ "$(code -H "Cookie: $COOKIE" "$TG/api/data")" = 403 ] || die "C: no X-CSRF must be 403"
[ "$(code -H 'X-CSRF: 1' "$TG/api/data")" = 401 ] || die "C: no session must be 401"
st=$(code -H "Cookie: $COOKIE" -H 'X-CSRF: 1' "$TG/api/data")
[ "$st" = 200 ] || die "C: tokengate answered $st"
log "logged in through tokengate (session cookie ${#COOKIE} bytes); A, B, C answer 200"

# ---------------------------------------------------------------- D: redis store (placeholder)
# TARGET D — tokengate with session.store = "redis". Enabled automatically once the binary
# accepts it (`tokengate check`) and redis-server is installed; skipped (and said so) otherwise.
TARGETS="A B C"
tg_config "$WORK/tg-redis.toml" "$TGR_PORT" "$ISSUER" redis
if "$BIN" check --config "$WORK/tg-redis.toml" >"$WORK/check-redis.out" 2>&1; then
  if command -v redis-server >/dev/null; then
    spawn redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no
    wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT" || die "redis-server did not start"
    spawn tgr "$BIN" --config "$WORK/tg-redis.toml"
    TGR_PID=$LAST_PID
    TGR=http://127.0.0.1:$TGR_PORT
    wait_for 30 ready "$TGR" || die "tokengate (redis) not ready: $(tail -5 "$WORK/tgr.err")"
    COOKIE_R=$(login_cookie "$TGR" "$ISSUER" redis)
    [ "$(code -H "Cookie: $COOKIE_R" -H 'X-CSRF: 1' "$TGR/api/data")" = 200 ] || die "D: tokengate (redis)"
    TARGETS="A B C D"
    # E: the same store, each replica keeping the sessions it read (invalidated through pub/sub)
    tg_config "$WORK/tg-redis-cache.toml" "$TGE_PORT" "$ISSUER" redis "" "redis_cache_ms = $REDIS_CACHE_MS"
    spawn tge "$BIN" --config "$WORK/tg-redis-cache.toml"
    TGE_PID=$LAST_PID
    TGE=http://127.0.0.1:$TGE_PORT
    wait_for 30 ready "$TGE" || die "tokengate (redis + cache) not ready: $(tail -5 "$WORK/tge.err")"
    COOKIE_E=$(login_cookie "$TGE" "$ISSUER" redis-cache)
    [ "$(code -H "Cookie: $COOKIE_E" -H 'X-CSRF: 1' "$TGE/api/data")" = 200 ] || die "E: tokengate (redis + cache)"
    TARGETS="A B C D E"
    fact redis_note "redis-server $(redis-server --version | awk '{print $3}' | tr -d 'v=')"
  else
    fact redis_note "skipped: the binary supports session.store = \"redis\" but redis-server is not installed (apt-get install -y redis-server)"
  fi
else
  fact redis_note "skipped: this tokengate build does not accept session.store = \"redis\" ($(grep -o 'session.store[^;]*' "$WORK/check-redis.out" | head -1))"
fi

# HOLD=1: keep the stack up for profiling by hand (perf, strace, wrk) instead of measuring; the
# ports and fresh session cookies are in $WORK/hold.env; Ctrl-C (or kill) stops everything.
if [ "${HOLD:-0}" = 1 ]; then
  KEEP_WORK=1
  log "HOLD=1: stack up, see $WORK/hold.env (cookies renewed every 50 s); Ctrl-C to stop"
  while :; do
    {
      echo "UP=http://127.0.0.1:$UP_PORT NGX=http://127.0.0.1:$NGX_PORT TG=$TG TG_PID=$TG_PID"
      echo "COOKIE='$(login_cookie "$TG" "$ISSUER" main)'"
      if [ -n "${TGR:-}" ]; then
        echo "TGR=$TGR TGR_PID=$TGR_PID"
        echo "COOKIE_R='$(login_cookie "$TGR" "$ISSUER" redis)'"
        echo "TGE=$TGE TGE_PID=$TGE_PID"
        echo "COOKIE_E='$(login_cookie "$TGE" "$ISSUER" redis-cache)'"
      fi
    } >"$WORK/hold.env.new"
    mv "$WORK/hold.env.new" "$WORK/hold.env"
    # in the background: a signal ends `wait` at once (a foreground sleep would delay the trap)
    sleep 50 &
    wait $!
  done
fi

# ---------------------------------------------------------------- load: rounds A B C [D]
target_url() {
  case $1 in
    A) echo "http://127.0.0.1:$UP_PORT/api/data" ;;
    B) echo "http://127.0.0.1:$NGX_PORT/api/data" ;;
    C) echo "$TG/api/data" ;;
    D) echo "$TGR/api/data" ;;
    E) echo "$TGE/api/data" ;;
  esac
}
RAW=$WORK/raw.tsv
: >"$RAW"
# Cookie targets log in again before each run: tokengate re-seals the session (and sends a
# Set-Cookie) once a minute per session for the idle timeout; a browser stores that cookie, wrk
# does not, so a cookie older than 60 s would make every request of the run re-seal.
run_wrk() { # TARGET CONNS ROUND SECONDS
  local t=$1 c=$2 r=$3 d=$4 out=$WORK/wrk-$1-$2-$3.txt hdrs=() line
  case $t in
    A) hdrs=(-H 'Authorization: Bearer x') ;;
    B) hdrs=() ;;
    C)
      COOKIE=$(login_cookie "$TG" "$ISSUER" main)
      hdrs=(-H "Cookie: $COOKIE" -H 'X-CSRF: 1')
      ;;
    D)
      COOKIE_R=$(login_cookie "$TGR" "$ISSUER" redis)
      hdrs=(-H "Cookie: $COOKIE_R" -H 'X-CSRF: 1')
      ;;
    E)
      COOKIE_E=$(login_cookie "$TGE" "$ISSUER" redis-cache)
      hdrs=(-H "Cookie: $COOKIE_E" -H 'X-CSRF: 1')
      ;;
  esac
  local proxy_pids up_pids c0 u0 c1 u1 a0 a1 x0 x1
  case $t in
    A) proxy_pids="" ;;
    B) proxy_pids=$(nginx_pids "$NGX_PID") ;;
    C) proxy_pids=$TG_PID ;;
    D) proxy_pids=$TGR_PID ;;
    E) proxy_pids=$TGE_PID ;;
  esac
  up_pids=$(nginx_pids "$UP_PID")
  c0=$(cpu_ticks $proxy_pids)
  u0=$(cpu_ticks $up_pids)
  a0=$(up_accepts)
  x0=$(ctx_switches $proxy_pids)
  timeout $((d + 60)) wrk -t1 -c"$c" -d"${d}s" --timeout 10s -s "$ROOT/bench/wrk-report.lua" \
    "${hdrs[@]}" "$(target_url "$t")" >"$out" 2>&1 || die "wrk $t c=$c: $(tail -3 "$out")"
  c1=$(cpu_ticks $proxy_pids)
  u1=$(cpu_ticks $up_pids)
  a1=$(up_accepts)
  x1=$(ctx_switches $proxy_pids)
  line=$(grep '^RESULT ' "$out") || die "wrk $t c=$c printed no result: $(tail -3 "$out")"
  # CPU time per request of the proxy under test and of the upstream (µs), from /proc/PID/stat
  line+=$(awk -v c=$((c1 - c0)) -v u=$((u1 - u0)) -v hz="$CLK_TCK" -v l="$line" 'BEGIN {
    match(l, /requests=[0-9]+/); n = substr(l, RSTART + 9, RLENGTH - 9) + 0; if (n < 1) n = 1
    printf " cpu_us=%.1f upcpu_us=%.1f", c * 1e6 / hz / n, u * 1e6 / hz / n }') # upstream_conns: new connections the upstream accepted during the run
  line+=" upstream_conns=$((a1 - a0 - 1))"
  line+=$(awk -v x=$((x1 - x0)) -v l="$line" 'BEGIN {
    match(l, /requests=[0-9]+/); n = substr(l, RSTART + 9, RLENGTH - 9) + 0; if (n < 1) n = 1
    printf " ctxsw_per_req=%.2f", x / n }')
  [ "$r" = warmup ] || [ "$r" = profile ] || printf '%s %s %s %s\n' "$r" "$t" "$c" "${line#RESULT }" >>"$RAW"
  case $line in *" non2xx=0"*) ;; *) log "WARNING: $t c=$c round $r had non-2xx answers: $line" ;; esac
}
start_sampler up 0.2 $(nginx_pids "$UP_PID")
S_UP=$SAMPLER_PID
start_sampler ngx 0.2 $(nginx_pids "$NGX_PID")
S_NGX=$SAMPLER_PID
start_sampler tg 0.2 "$TG_PID"
S_TG=$SAMPLER_PID
if [ -n "${TGR_PID:-}" ]; then
  start_sampler tgr 0.2 "$TGR_PID"
  S_TGR=$SAMPLER_PID
fi
if [ -n "${TGE_PID:-}" ]; then
  start_sampler tge 0.2 "$TGE_PID"
  S_TGE=$SAMPLER_PID
fi
fact load_before_load "$(cut -d' ' -f1-3 /proc/loadavg)"
max_c=$(echo $CONNS | tr ' ' '\n' | sort -n | tail -1)
log "warm-up: ${WARMUP}s per target at $max_c connections"
for t in $TARGETS; do run_wrk "$t" "$max_c" warmup "$WARMUP"; done
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONNS; do
    for t in $TARGETS; do
      log "round $r/$ROUNDS  c=$c  target $t"
      run_wrk "$t" "$c" "$r" "$DURATION"
    done
  done
done
stop_sampler "$S_UP"
stop_sampler "$S_NGX"
stop_sampler "$S_TG"
[ -n "${S_TGR:-}" ] && stop_sampler "$S_TGR"
[ -n "${S_TGE:-}" ] && stop_sampler "$S_TGE"

# ---------------------------------------------------------------- optional: where tokengate's time goes
# PROFILE=1: one more C run at 32 connections under `perf record -e cpu-clock` (software event:
# works in VMs without hardware counters); the flat profile goes to bench/results/perf-tokengate.txt.
if [ "${PROFILE:-0}" = 1 ]; then
  if command -v perf >/dev/null && perf record -e cpu-clock -o "$WORK/perf-probe.data" -- true >/dev/null 2>&1; then
    log "profiling tokengate (perf record, c=32, ${DURATION}s)"
    perf record -e cpu-clock -F 1999 -g -o "$WORK/perf.data" -p "$TG_PID" -- sleep $((DURATION + 2)) \
      >"$WORK/perf-record.out" 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    run_wrk C 32 profile "$DURATION"
    wait "$PERF_PID" || true
    (
      set +e +o pipefail # head closes the pipes early
      echo "# perf record -e cpu-clock -g -p <tokengate> during wrk -t1 -c32 -d${DURATION}s (target C)"
      echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), tokengate $(git rev-parse --short HEAD 2>/dev/null)"
      echo "# load average: $(cut -d' ' -f1-3 /proc/loadavg)"
      echo
      echo "## by shared object"
      perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
      echo
      echo "## top symbols (self time)"
      perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60
    ) | sed 's/[[:space:]]*$//; s/[[:space:]]*-[[:space:]]*-$//' >"$WORK/perf-top.txt"
    mkdir -p "$(dirname "$OUT")"
    cp "$WORK/perf-top.txt" "$(dirname "$OUT")/perf-tokengate.txt"
  else
    log "PROFILE=1: perf is not usable here (apt-get install -y linux-perf; kernel.perf_event_paranoid)"
  fi
fi

fact rss_up_kb "$(peak_of up)"
fact rss_ngx_kb "$(peak_of ngx)"
fact rss_tg_kb "$(peak_of tg)"
fact hwm_ngx_kb "$(FIELD=VmHWM rss_kb $(nginx_pids "$NGX_PID"))"
fact hwm_tg_kb "$(FIELD=VmHWM rss_kb "$TG_PID")"
if [ -n "${TGR_PID:-}" ]; then
  fact rss_tgr_kb "$(peak_of tgr)"
  fact hwm_tgr_kb "$(FIELD=VmHWM rss_kb "$TGR_PID")"
fi
if [ -n "${TGE_PID:-}" ]; then
  fact rss_tge_kb "$(peak_of tge)"
  fact hwm_tge_kb "$(FIELD=VmHWM rss_kb "$TGE_PID")"
fi
fact load_after_load "$(cut -d' ' -f1-3 /proc/loadavg)"
# log.level = "warn": a quiet run writes next to nothing; per-request lines would skew every number
fact tg_stderr_lines "$(wc -l <"$WORK/tg.err")"

# ---------------------------------------------------------------- 1 GiB each way
# transfer NAME KIND(down|up) URL curl-args...: facts NAME_mibs, NAME_ok (+ tokengate RSS growth)
transfer() {
  local name=$1 kind=$2 url=$3 w before st bytes secs
  shift 3
  before=$(rss_kb "$TG_PID")
  start_sampler "$name" 0.05 "$TG_PID"
  if [ "$kind" = down ]; then
    w=$(curl -sS --max-time 600 -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$@" "$url") || w="000 0 0"
  else
    w=$(curl -sS --max-time 600 -o "$WORK/$name.body" -w '%{http_code} %{size_upload} %{time_total}' \
      -X POST -T "$WORK/www/api/big" -H 'Expect:' -H 'Content-Type: application/octet-stream' "$@" "$url") || w="000 0 0"
  fi
  stop_sampler "$SAMPLER_PID"
  read -r st bytes secs <<<"$w"
  if [ "$kind" = up ]; then bytes=$(json_num bytes <"$WORK/$name.body" || echo 0); fi
  fact "${name}_status" "$st"
  fact "${name}_bytes" "${bytes:-0}"
  fact "${name}_secs" "$secs"
  fact "${name}_rss_before_kb" "$before"
  fact "${name}_rss_peak_kb" "$(peak_of "$name")"
  log "$name: HTTP $st, ${bytes:-0} bytes in ${secs}s"
}
log "1 GiB transfers"
cat "$WORK/www/api/big" >/dev/null # page cache warm for every download alike
fact big_bytes "$BIG_BYTES"
transfer dl_direct down "http://127.0.0.1:$UP_PORT/api/big" -H 'Authorization: Bearer x'
transfer dl_nginx down "http://127.0.0.1:$NGX_PORT/api/big"
COOKIE=$(login_cookie "$TG" "$ISSUER" main)
transfer dl_tg down "$TG/api/big" -H "Cookie: $COOKIE" -H 'X-CSRF: 1'
transfer ul_direct up "http://127.0.0.1:$SINK_PORT/upload" -H 'Authorization: Bearer x'
transfer ul_tg up "$TG/sink/upload" -H "Cookie: $COOKIE" -H 'X-CSRF: 1'
fact hwm_tg_after_transfers_kb "$(FIELD=VmHWM rss_kb "$TG_PID")"

# ---------------------------------------------------------------- idle keep-alive connections
# What a proxy holds per browser connection between requests (most of a connection's life):
# IDLE_CONNS connections, one API call each, then held idle while its RSS is read.
# idle_rss NAME PORT PIDS HEADER...: facts idle_NAME_before_kb, idle_NAME_held_kb, idle_NAME_ok
idle_rss() {
  local name=$1 port=$2 pids=$3 before held i
  shift 3
  before=$(rss_kb $pids)
  python3 bench/idle_conns.py "$port" "$IDLE_CONNS" 4 /api/data "$@" >"$WORK/idle-$name.out" 2>&1 &
  local pid=$!
  for i in $(seq 1 300); do
    grep -q '^ready' "$WORK/idle-$name.out" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 1
  held=$(rss_kb $pids)
  wait "$pid" || true
  fact "idle_${name}_before_kb" "$before"
  fact "idle_${name}_held_kb" "$held"
  fact "idle_${name}_ok" "$(awk '/^ready/ {print $2}' "$WORK/idle-$name.out")"
  log "$name: $IDLE_CONNS idle connections, RSS $before -> $held kB ($(head -1 "$WORK/idle-$name.out"))"
}
log "$IDLE_CONNS idle keep-alive connections"
fact idle_conns "$IDLE_CONNS"
idle_rss ngx "$NGX_PORT" "$(nginx_pids "$NGX_PID")"
COOKIE=$(login_cookie "$TG" "$ISSUER" main)
idle_rss tg "$TG_PORT" "$TG_PID" "Cookie: $COOKIE" "X-CSRF: 1"

# ---------------------------------------------------------------- start-up to ready
log "start-up: $STARTS starts, /readyz polled every 5 ms"
python3 bench/startup.py "$BIN" "$WORK/tg.toml" "$STARTS" "$WORK/startup.log" >"$WORK/startup.json" ||
  die "startup measurement failed"
fact startup_json "$(cat "$WORK/startup.json")"

# ---------------------------------------------------------------- refresh stampede
log "refresh stampede: $STAMPEDE_N concurrent requests on an expired access token"
tg_config "$WORK/tg2.toml" "$TG2_PORT" "$ISSUER2" cookie
spawn tg2 "$BIN" --config "$WORK/tg2.toml"
TG2=http://127.0.0.1:$TG2_PORT
wait_for 30 ready "$TG2" || die "tokengate (stampede) not ready: $(tail -5 "$WORK/tg2.err")"
COOKIE2=$(login_cookie "$TG2" "$ISSUER2" stampede)
sleep $((STAMPEDE_TTL + 1)) # the access token has now expired
refresh_grants() { curl -s --max-time 5 "$ISSUER2/__stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["grants"]["refresh_token"])'; }
g0=$(refresh_grants)
{
  for _ in $(seq 1 "$STAMPEDE_N"); do printf 'url = "%s/api/data"\noutput = "/dev/null"\n' "$TG2"; done
} >"$WORK/stampede.curl"
curl -s --parallel --parallel-immediate --parallel-max "$STAMPEDE_N" --max-time 30 \
  -H "Cookie: $COOKIE2" -H 'X-CSRF: 1' -w '%{http_code} %{time_total}\n' -K "$WORK/stampede.curl" \
  >"$WORK/stampede.out" 2>"$WORK/stampede.err" || true
sleep 0.2
g1=$(refresh_grants)
fact stampede_n "$STAMPEDE_N"
fact stampede_grants "$((g1 - g0))"
fact stampede_200 "$(grep -c '^200 ' "$WORK/stampede.out" || true)"
fact stampede_codes "$(awk '{print $1}' "$WORK/stampede.out" | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}')"
fact stampede_max_s "$(awk 'BEGIN{m=0} $2 > m {m=$2} END{print m}' "$WORK/stampede.out")"

fact load_after "$(cut -d' ' -f1-3 /proc/loadavg)"
fact finished "$(date -u '+%Y-%m-%d %H:%M UTC')"

# ---------------------------------------------------------------- report
mkdir -p "$(dirname "$OUT")"
python3 bench/report.py "$RAW" "$FACTS" >"$OUT" || die "report"
cp "$RAW" "${OUT%.md}.raw.tsv"
cat "$OUT"
log "written: $OUT (raw wrk results: ${OUT%.md}.raw.tsv)"
