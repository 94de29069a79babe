-- wrk script for bench/soak.sh: a paced, browser-like API client of tokengate.
--
--   wrk -t1 -c32 -d20s -s bench/soak-wrk.lua URL -- RATE COOKIE_IN COOKIE_OUT
--
-- RATE        requests per second for this thread (0 = as fast as possible: capacity runs).
--             Pacing: one shared schedule per thread; before each request a connection waits for
--             the next free slot (wrk's delay() hook, ms resolution), so the aggregate rate is
--             RATE whatever the connection count, as long as the connections can carry it.
--             Falling behind is caught up for at most 100 ms (no bursts after a stall).
-- COOKIE_IN   file with the Cookie header value to start with (tg_session=...)
-- COOKIE_OUT  file the last session cookie is written to at the end (the next segment's start)
--
-- Like a browser, the script adopts the session cookie tokengate sets (after a transparent
-- refresh, or the once-a-minute idle touch): without that, every request after the first refresh
-- would carry the pre-rotation cookie, which tokengate only honours for 30 s.
-- Every request sends the cookie and X-CSRF: 1. Status codes are counted per code.
-- One parseable line at the end:
--   RESULT requests=N duration_us=N rps=N p50=.. p99=.. max=.. connect_err=.. read_err=..
--          write_err=.. timeouts=.. s2xx=N s3xx=N s4xx=N s5xx=N codes=200:N,401:N adopted=N
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } soak_timespec;
  int clock_gettime(int clk, soak_timespec *ts);
]]
local ts = ffi.new("soak_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local req, interval, next_slot
cookie, out_path, counts, adopted = nil, nil, {}, 0

local function build()
  local h = { ["X-CSRF"] = "1", ["Accept"] = "application/json" }
  if cookie then h["Cookie"] = cookie end
  req = wrk.format("GET", wrk.path, h)
end

function init(args)
  local rate = tonumber(args[1] or "0") or 0
  interval = rate > 0 and 1000 / rate or 0
  local f = args[2] and io.open(args[2], "r")
  if f then
    cookie = f:read("*l")
    f:close()
    if cookie == "" then cookie = nil end
  end
  out_path = args[3]
  next_slot = now_ms()
  build()
end

function delay()
  if interval == 0 then return 0 end
  local now = now_ms()
  if next_slot < now - 100 then next_slot = now - 100 end
  local slot = next_slot
  next_slot = next_slot + interval
  local d = slot - now
  if d < 1 then return 0 end
  return math.floor(d)
end

function request()
  return req
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  local sc = headers["set-cookie"] or headers["Set-Cookie"]
  if sc then
    local name, value = sc:match("^%s*([^=;%s]+)=([^;]*)")
    if name == "tg_session" or name == "__Host-tg_session" then
      if value ~= "" then cookie = name .. "=" .. value else cookie = nil end
      adopted = adopted + 1
      build()
    end
  end
end

function done(summary, latency, requests)
  local agg, last_cookie, path, adopt = {}, nil, nil, 0
  for _, t in ipairs(threads) do
    local c = t:get("counts") or {}
    for k, v in pairs(c) do agg[k] = (agg[k] or 0) + v end
    last_cookie = t:get("cookie")
    path = path or t:get("out_path")
    adopt = adopt + (t:get("adopted") or 0)
  end
  local s = { 0, 0, 0, 0, 0 }
  local codes = {}
  for k, v in pairs(agg) do
    local cls = math.floor(k / 100)
    if cls >= 1 and cls <= 5 then s[cls] = s[cls] + v end
    table.insert(codes, k .. ":" .. v)
  end
  table.sort(codes)
  if path then
    local f = io.open(path, "w")
    if f then
      f:write((last_cookie or "") .. "\n")
      f:close()
    end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50=%d p90=%d p99=%d p999=%d max=%d " ..
    "connect_err=%d read_err=%d write_err=%d timeouts=%d s2xx=%d s3xx=%d s4xx=%d s5xx=%d " ..
    "codes=%s adopted=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.timeout, s[2], s[3], s[4], s[5],
    (#codes > 0 and table.concat(codes, ",") or "-"), adopt))
end
