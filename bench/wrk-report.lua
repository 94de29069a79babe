-- wrk reporter for bench/run.sh: one parseable line at the end of a run.
-- Latencies are in microseconds; "non2xx" counts answers that were not 2xx/3xx (wrk's
-- errors.status), which would make a run invalid (e.g. a 401 from a lost session).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50=%d p90=%d p99=%d p999=%d max=%d " ..
    "connect_err=%d read_err=%d write_err=%d timeouts=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
