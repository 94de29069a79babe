// The demo/test upstream API behind tokengate: checks the bearer token against the
// IdP's userinfo endpoint and echoes what it received.
//
// Env:
//   PORT    listen port on 127.0.0.1 (default 0 = random)
//   ISSUER  the IdP issuer, e.g. http://127.0.0.1:9000 (discovery is fetched once and cached)
//
// On listening, prints exactly one JSON line to stdout: {"port":N}. Logs go to stderr.
//
// Every request except GET /__stats:
//   no "Authorization: Bearer <token>"  -> 401 {"error":"missing_token"}
//   token rejected by the IdP userinfo  -> 401 {"error":"invalid_token"}
//   IdP unreachable                     -> 502 {"error":"idp_unavailable"}
//   otherwise the body is consumed as a stream (counted, not buffered) and the answer is
//   200 {"method","path","headers","raw_headers","authorization_lines","token_verified",
//        "sub","name","body_bytes"} (the Authorization value itself is never echoed)
// GET /__stats (no auth) -> {"requests": n, "ok": m}
//   requests = every request received other than /__stats, ok = those answered 200.

import http from 'node:http';

const log = (...args) => console.error('[echo-api]', ...args);

const PORT = Number(process.env.PORT || 0);
const ISSUER = (process.env.ISSUER || 'http://127.0.0.1:9000').replace(/\/+$/, '');

const stats = { requests: 0, ok: 0 };

let discovery; // Promise<object>, cached once it succeeds
function getDiscovery() {
  if (!discovery) {
    discovery = (async () => {
      const res = await fetch(`${ISSUER}/.well-known/openid-configuration`);
      if (!res.ok) throw new Error(`discovery: HTTP ${res.status}`);
      const doc = await res.json();
      if (!doc.userinfo_endpoint) throw new Error('discovery: no userinfo_endpoint');
      return doc;
    })();
    discovery.catch(() => { discovery = undefined; }); // retry on the next request
  }
  return discovery;
}

function send(res, status, body) {
  const json = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(json),
  });
  res.end(json);
}

// the request body is drained (not read) when answering early
function reject(req, res, status, error) {
  req.resume();
  send(res, status, { error });
}

async function handle(req, res) {
  if (req.method === 'GET' && req.url === '/__stats') {
    send(res, 200, stats);
    return;
  }
  stats.requests += 1;

  const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization || '');
  if (!m) {
    reject(req, res, 401, 'missing_token');
    return;
  }

  let claims;
  try {
    const { userinfo_endpoint: userinfoEndpoint } = await getDiscovery();
    const r = await fetch(userinfoEndpoint, { headers: { authorization: `Bearer ${m[1]}` } });
    if (!r.ok) {
      await r.arrayBuffer().catch(() => {});
      reject(req, res, 401, 'invalid_token');
      return;
    }
    claims = await r.json();
  } catch (err) {
    log('IdP unavailable:', err.message);
    reject(req, res, 502, 'idp_unavailable');
    return;
  }

  let bodyBytes = 0;
  for await (const chunk of req) bodyBytes += chunk.length;

  // The token is verified above; it is never echoed back (the SPA must not see it).
  const redact = (name, value) => (name === 'authorization' ? '[redacted]' : value);
  const rawHeaders = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i].toLowerCase();
    rawHeaders.push([name, redact(name, req.rawHeaders[i + 1])]);
  }
  const headers = Object.fromEntries(
    Object.entries(req.headers).map(([k, v]) => [k, redact(k, v)]),
  );

  stats.ok += 1;
  send(res, 200, {
    method: req.method,
    path: req.url,
    headers, // lower-case names; repeated headers joined by node; authorization redacted
    raw_headers: rawHeaders, // every header line in order, names lower-cased
    authorization_lines: rawHeaders.filter(([k]) => k === 'authorization').length,
    token_verified: true, // the bearer token was accepted by the IdP's userinfo endpoint
    sub: claims.sub,
    name: claims.name ?? null,
    body_bytes: bodyBytes,
  });
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    log('error:', err);
    if (!res.headersSent) send(res, 500, { error: 'server_error' });
    else res.destroy();
  });
});

server.listen(PORT, '127.0.0.1', () => {
  const { port } = server.address();
  process.stdout.write(`${JSON.stringify({ port })}\n`);
  log(`listening on 127.0.0.1:${port}, issuer ${ISSUER}`);
});

const shutdown = (sig) => {
  log(`${sig}, exiting`);
  server.close();
  server.closeAllConnections();
  process.exit(0);
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
