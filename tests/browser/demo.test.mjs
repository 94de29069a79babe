// End-to-end test of the demo stack (README command 1, scripts/demo.sh) in real headless Chromium:
// a user logs in at the real IdP (oidc-provider), calls the API through tokengate, keeps working
// past the access token's lifetime (tokengate refreshes transparently), refreshes by hand and
// logs out at the IdP. Along the way no token may ever be visible to JavaScript.
//
//   scripts/browser-test.sh            (installs what is missing, then runs this file)
//   node --test tests/browser/         (needs tests/browser/node_modules and /usr/bin/chromium)
//
// Needs 127.0.0.1:8080, :9000 and :3000 free. Everything is bounded in time, and the whole demo
// stack (started as its own process group) is killed at the end, also when a step fails.
// Artifacts: target/browser-artifacts/ (screenshots NN-*.png, demo.log = the output of
// scripts/demo.sh including tokengate's log, browser.log, failure.txt + FAILED.png on failure).
//
// Env (all optional):
//   CHROMIUM                          browser binary (default /usr/bin/chromium)
//   DEMO_PROFILE                      passed to scripts/demo.sh (default here: debug; demo.sh: release)
//   BROWSER_TEST_STARTUP_TIMEOUT_S    bound on build + start of the stack (default 900)

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const ARTIFACTS = path.join(ROOT, 'target', 'browser-artifacts');
const DEMO_LOG = path.join(ARTIFACTS, 'demo.log');
const BROWSER_LOG = path.join(ARTIFACTS, 'browser.log');

const BFF = 'http://localhost:8080'; // public_url in config.toml: the origin the user types
const BFF_DIRECT = 'http://127.0.0.1:8080'; // same socket, for node's own polling
const IDP = 'http://127.0.0.1:9000';
const PORTS = [8080, 9000, 3000];

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STARTUP_TIMEOUT_S = Number(process.env.BROWSER_TEST_STARTUP_TIMEOUT_S || 900);
const TOKEN_TTL_S = 25; // IdP access-token lifetime for this run
const REFRESH_SKEW_S = 0; // tokengate refreshes once the token has expired (no early refresh)
const STEP_TIMEOUT_MS = 20_000; // default bound of every browser wait
const FLOW_TIMEOUT_MS = 240_000; // bound of the whole browser flow

const JWT_LIKE = /eyJ[A-Za-z0-9_-]{8,}/;
const BEARER = /Bearer\s/i;
const TG_COOKIE = /(^|\s|;)(__Host-)?tg_/;
const SESSION_COOKIE = /^(__Host-)?tg_session(\.\d+)?$/;

const log = (...args) => console.log('[browser-test]', ...args);

// ---------------------------------------------------------------- the demo stack

let demo; // the scripts/demo.sh child, leader of its own process group
let demoExit; // { code, signal } once demo.sh has exited
let browser;

function tail(file, lines = 40) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return `(no ${file})`;
  }
}

// true when something accepts connections on host:port
function listening(host, port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const done = (inUse) => { socket.destroy(); resolve(inUse); };
    socket.setTimeout(2000, () => done(true));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false)); // ECONNREFUSED, or no IPv6 loopback at all
  });
}

function groupAlive(pid) {
  try {
    process.kill(-pid, 0);
    return true;
  } catch {
    return false;
  }
}

function killGroup(signal) {
  if (!demo?.pid) return;
  try {
    process.kill(-demo.pid, signal);
  } catch { /* already gone */ }
}

// SIGTERM to the whole group (demo.sh, cargo, tokengate, the IdP, the echo API), then SIGKILL
// whatever is left after 10 s
async function stopStack() {
  if (!demo?.pid) return;
  if (groupAlive(demo.pid)) killGroup('SIGTERM');
  const deadline = Date.now() + 10_000;
  while (groupAlive(demo.pid) && Date.now() < deadline) await sleep(100);
  if (groupAlive(demo.pid)) {
    log('demo stack still running 10 s after SIGTERM: SIGKILL');
    killGroup('SIGKILL');
    await sleep(200);
  }
  if (!groupAlive(demo.pid)) demo = null; // never signal a process group id that may be reused
}

// last resort when this process ends without running the after() hook
process.on('exit', () => killGroup('SIGKILL'));
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killGroup('SIGTERM');
    setTimeout(() => { killGroup('SIGKILL'); process.exit(130); }, 2000).unref();
  });
}

async function startStack() {
  const busy = [];
  for (const port of PORTS) {
    if (await listening('127.0.0.1', port)) busy.push(`127.0.0.1:${port}`);
  }
  if (await listening('::1', 8080)) busy.push('[::1]:8080');
  if (busy.length) {
    throw new Error(`port(s) already in use: ${busy.join(', ')}. The browser test runs the demo stack `
      + `(scripts/demo.sh) on 127.0.0.1:8080, :9000 and :3000: stop whatever listens there `
      + '(another scripts/demo.sh?) and run it again.');
  }

  fs.rmSync(ARTIFACTS, { recursive: true, force: true });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const out = fs.openSync(DEMO_LOG, 'w');
  const env = {
    ...process.env,
    DEMO_PROFILE: process.env.DEMO_PROFILE || 'debug',
    IDP_ACCESS_TOKEN_TTL: String(TOKEN_TTL_S),
    TOKENGATE_OAUTH__REFRESH_SKEW_S: String(REFRESH_SKEW_S),
    NO_COLOR: process.env.NO_COLOR || '1', // plain text in demo.log
  };
  log(`starting scripts/demo.sh (DEMO_PROFILE=${env.DEMO_PROFILE}, IDP_ACCESS_TOKEN_TTL=${TOKEN_TTL_S}, `
    + `TOKENGATE_OAUTH__REFRESH_SKEW_S=${REFRESH_SKEW_S}); output: ${path.relative(ROOT, DEMO_LOG)}`);
  demo = spawn('bash', [path.join(ROOT, 'scripts', 'demo.sh')], {
    cwd: ROOT,
    env,
    detached: true, // own process group: killed as a whole at the end
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  demo.once('exit', (code, signal) => { demoExit = { code, signal }; });

  const started = Date.now();
  const deadline = started + STARTUP_TIMEOUT_S * 1000;
  let last = 'no answer yet';
  while (Date.now() < deadline) {
    if (demoExit) {
      throw new Error(`scripts/demo.sh exited (code ${demoExit.code}, signal ${demoExit.signal}) before `
        + `tokengate was ready. Last lines of ${DEMO_LOG}:\n${tail(DEMO_LOG)}`);
    }
    try {
      const res = await fetch(`${BFF_DIRECT}/readyz`, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      if (res.status === 200) {
        log(`demo stack ready after ${((Date.now() - started) / 1000).toFixed(1)} s`);
        return;
      }
      last = `HTTP ${res.status}`;
    } catch (err) {
      last = err.cause?.code || err.message;
    }
    await sleep(500);
  }
  throw new Error(`${BFF}/readyz did not answer 200 within ${STARTUP_TIMEOUT_S} s (last: ${last}; `
    + `cargo may still be building: raise BROWSER_TEST_STARTUP_TIMEOUT_S). Last lines of ${DEMO_LOG}:\n`
    + tail(DEMO_LOG));
}

before(startStack, { timeout: (STARTUP_TIMEOUT_S + 60) * 1000 });

after(async () => {
  if (browser) {
    await Promise.race([browser.close().catch(() => {}), sleep(10_000)]);
  }
  await stopStack();
  log(`demo stack stopped; artifacts in ${path.relative(ROOT, ARTIFACTS)}/`);
}, { timeout: 30_000 });

// ---------------------------------------------------------------- helpers

async function idpStats() {
  const res = await fetch(`${IDP}/__stats`, { signal: AbortSignal.timeout(5000) });
  assert.equal(res.status, 200, 'IdP GET /__stats');
  return res.json();
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, name), fullPage: true });
}

async function waitForText(page, selector, expected, timeout = STEP_TIMEOUT_MS) {
  try {
    await page.waitForFunction(
      ([sel, want]) => document.querySelector(sel)?.textContent.trim() === want,
      [selector, expected],
      { timeout },
    );
  } catch {
    const read = (sel) => page.evaluate((s) => document.querySelector(s)?.textContent.trim() ?? null, sel)
      .catch(() => null);
    throw new Error(`expected ${selector} to read "${expected}" on ${page.url()}; it reads `
      + `${JSON.stringify(await read(selector))}; #error: ${JSON.stringify(await read('#error'))}; `
      + `#output: ${JSON.stringify(await read('#output'))}`);
  }
}

const onBff = (url) => url.origin === BFF && url.pathname === '/';

// "#output" as the SPA writes it: "METHOD PATH → STATUS TEXT\n\nBODY"
async function lastResponse(page) {
  const text = await page.textContent('#output');
  const m = /^(\S+) (\S+) → (\d{3})[^\n]*\n\n([\s\S]*)$/.exec(text);
  if (!m) return { text, status: null, body: null };
  let body = m[4];
  try { body = JSON.parse(body); } catch { /* not JSON */ }
  return { text, status: Number(m[3]), body };
}

// clicks an SPA button whose action calls `pathname`, and waits until the action has finished
// (the SPA disables the button meanwhile) so that #output shows its answer
async function clickFor(page, id, pathname) {
  await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === pathname),
    page.click(`#${id}`),
  ]);
  await page.waitForSelector(`#${id}:not([disabled])`);
  return lastResponse(page);
}

// what JavaScript on the SPA's page can see must hold no token; tokengate's cookies are HttpOnly
async function assertNoTokenForJs(page, context, step) {
  const seen = await page.evaluate(() => ({
    'document.cookie': document.cookie,
    localStorage: JSON.stringify({ ...localStorage }),
    sessionStorage: JSON.stringify({ ...sessionStorage }),
    'the page text': document.body.innerText,
    '#output': document.getElementById('output').textContent,
  }));
  assert.doesNotMatch(seen['document.cookie'], TG_COOKIE,
    `${step}: document.cookie shows a tokengate cookie (must be HttpOnly): ${seen['document.cookie']}`);
  for (const [where, text] of Object.entries(seen)) {
    assert.doesNotMatch(text, JWT_LIKE, `${step}: ${where} contains a JWT-looking value`);
    assert.doesNotMatch(text, BEARER, `${step}: ${where} contains "Bearer "`);
  }
  const cookies = (await context.cookies(BFF)).filter((c) => /^(__Host-)?tg_/.test(c.name));
  for (const c of cookies) {
    assert.equal(c.httpOnly, true, `${step}: cookie ${c.name} is not HttpOnly`);
    assert.ok(c.sameSite === 'Strict' || c.sameSite === 'Lax',
      `${step}: cookie ${c.name} has SameSite=${c.sameSite}`);
  }
  return cookies;
}

// ---------------------------------------------------------------- the user's session

test('demo stack in headless Chromium: login at the IdP, API call, transparent refresh, '
  + 'manual refresh, logout', { timeout: FLOW_TIMEOUT_MS }, async (t) => {
  const browserLog = fs.createWriteStream(BROWSER_LOG);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 60_000,
  });
  const context = await browser.newContext({ viewport: { width: 1000, height: 800 } });
  context.setDefaultTimeout(STEP_TIMEOUT_MS);
  context.setDefaultNavigationTimeout(30_000);
  const page = await context.newPage();

  const foreign = []; // requests the browser made to anything but tokengate and the IdP
  const pageErrors = [];
  context.on('request', (r) => {
    browserLog.write(`${new Date().toISOString()} ${r.method()} ${r.url().split('?')[0]}\n`);
    const url = new URL(r.url());
    if (/^https?:$/.test(url.protocol) && url.origin !== BFF && url.origin !== IDP) foreign.push(r.url());
  });
  page.on('console', (m) => browserLog.write(`console.${m.type()}: ${m.text()}\n`));
  page.on('pageerror', (err) => {
    pageErrors.push(`${page.url()}: ${err.message}`);
    browserLog.write(`pageerror: ${err.message}\n`);
  });

  let step = 'start';
  const begun = Date.now();
  const mark = (name) => {
    step = name;
    log(`${((Date.now() - begun) / 1000).toFixed(1).padStart(5)} s  ${name}`);
  };

  try {
    mark('open the SPA: not logged in');
    await page.goto(`${BFF}/`);
    await waitForText(page, '#user', 'not logged in');
    await assertNoTokenForJs(page, context, step);
    await screenshot(page, '01-home.png');

    mark('click "Log in": the IdP login form');
    await page.click('#login');
    await page.waitForURL((u) => u.origin === IDP && u.pathname.startsWith('/interaction/'));
    await page.fill('input[name="login"]', 'alice');
    await page.fill('input[name="password"]', 'any password');
    await screenshot(page, '02-idp-login.png');
    await page.click('button[type="submit"]');

    mark('the IdP consent page');
    await page.waitForSelector('input[name="prompt"][value="consent"]', { state: 'attached' });
    await screenshot(page, '03-idp-consent.png');
    await page.click('button[type="submit"]:has-text("Continue")');

    mark('back at the SPA, logged in as Alice');
    await page.waitForURL(onBff);
    await waitForText(page, '#user', 'Alice');
    const loggedInAt = Date.now();
    assert.match(await page.textContent('#sub'), /sub: alice\b/);
    const cookies = await assertNoTokenForJs(page, context, step);
    const session = cookies.filter((c) => SESSION_COOKIE.test(c.name));
    assert.ok(session.length > 0, `no tokengate session cookie after login; cookies: ${cookies.map((c) => c.name)}`);
    for (const c of session) assert.equal(c.sameSite, 'Strict', `session cookie ${c.name}: SameSite`);
    t.diagnostic(`tokengate cookies after login: ${cookies.map((c) => `${c.name} (HttpOnly, SameSite=${c.sameSite})`).join(', ')}`);
    await screenshot(page, '04-logged-in.png');
    const statsAtLogin = await idpStats();
    assert.equal(statsAtLogin.grants.authorization_code, 1, 'one authorization_code grant at the IdP');

    mark('click "Call API": 200, the echo API saw alice');
    let res = await clickFor(page, 'call-api', '/api/hello');
    assert.equal(res.status, 200, `GET /api/hello: ${res.text}`);
    assert.equal(res.body.sub, 'alice');
    assert.equal(res.body.token_verified, true);
    assert.equal(res.body.authorization_lines, 1, 'exactly one Authorization header reached the API');
    assert.doesNotMatch(res.body.headers.cookie ?? '', TG_COOKIE, 'tokengate cookies were forwarded to the API');
    await assertNoTokenForJs(page, context, step);
    await screenshot(page, '05-api.png');

    // With a 25 s token and no early-refresh skew, the session's access token is dead 25 s after
    // login. Wait past that, then call the API once more: tokengate must refresh on the way.
    const beforeExpiry = await idpStats();
    assert.equal(beforeExpiry.grants.refresh_token, statsAtLogin.grants.refresh_token,
      `a refresh happened before the token expired: ${JSON.stringify(beforeExpiry)}`);
    mark(`wait past the access token's expiry (${TOKEN_TTL_S} s after login), then call the API again`);
    const expired = loggedInAt + (TOKEN_TTL_S + 2) * 1000;
    await sleep(Math.max(0, expired - Date.now()));
    res = await clickFor(page, 'call-api', '/api/hello');
    assert.equal(res.status, 200, `GET /api/hello ${((Date.now() - loggedInAt) / 1000).toFixed(0)} s after `
      + `login, past the token's expiry (tokengate should have refreshed it): ${res.text}`);
    assert.equal(res.body.sub, 'alice');
    let stats = await idpStats();
    assert.ok(stats.grants.refresh_token === statsAtLogin.grants.refresh_token + 1,
      `the call past expiry made no (or more than one) refresh_token grant: ${JSON.stringify(stats)}`);
    t.diagnostic(`transparent refresh on the first call past expiry; IdP grants: ${JSON.stringify(stats.grants)}`);
    await assertNoTokenForJs(page, context, step);
    await screenshot(page, '06-api-after-refresh.png');

    mark('click "Refresh token": expires_in');
    const before = stats.grants.refresh_token;
    res = await clickFor(page, 'refresh', '/refreshtoken');
    assert.equal(res.status, 200, `POST /refreshtoken: ${res.text}`);
    for (const key of ['access_token', 'refresh_token', 'id_token']) {
      assert.ok(!(key in res.body), `POST /refreshtoken hands ${key} to JavaScript`);
    }
    assert.ok(Number.isInteger(res.body.expires_in) && res.body.expires_in > 0
      && res.body.expires_in <= TOKEN_TTL_S + 5, `expires_in: ${res.body.expires_in}`);
    stats = await idpStats();
    assert.ok(stats.grants.refresh_token > before, `POST /refreshtoken made no refresh grant: ${JSON.stringify(stats)}`);
    await waitForText(page, '#user', 'Alice');
    await assertNoTokenForJs(page, context, step);
    await screenshot(page, '07-refresh.png');

    mark('click "Log out": the IdP sign-out page');
    const revocationsBefore = stats.revocations;
    await page.click('#logout');
    await page.waitForURL((u) => u.origin === IDP && u.pathname.startsWith('/session/end'));
    await page.waitForSelector('button[name="logout"][value="yes"]');
    await screenshot(page, '08-idp-logout.png');
    await page.click('button[name="logout"][value="yes"]');

    mark('back at the SPA, not logged in');
    await page.waitForURL(onBff);
    await waitForText(page, '#user', 'not logged in');
    const left = await assertNoTokenForJs(page, context, step);
    assert.deepEqual(left.filter((c) => SESSION_COOKIE.test(c.name)).map((c) => c.name), [],
      'the session cookie is gone after logout');
    stats = await idpStats();
    assert.ok(stats.revocations > revocationsBefore && stats.revoked.refresh_token >= 1,
      `logout revoked no refresh token at the IdP: ${JSON.stringify(stats)}`);

    mark('click "Call API" once more: 401');
    res = await clickFor(page, 'call-api', '/api/hello');
    assert.equal(res.status, 401, `GET /api/hello after logout: ${res.text}`);
    await assertNoTokenForJs(page, context, step);
    await screenshot(page, '09-logged-out.png');

    assert.deepEqual(pageErrors, [], 'uncaught JavaScript errors');
    assert.deepEqual(foreign, [], 'the browser fetched something other than tokengate and the IdP');
    mark(`done; IdP: ${JSON.stringify(stats)}`);
  } catch (err) {
    await screenshot(page, 'FAILED.png').catch(() => {});
    const state = await page.evaluate(() => Object.fromEntries(['user', 'error', 'output']
      .map((id) => [id, document.getElementById(id)?.textContent ?? null]))).catch(() => ({}));
    const report = `step: ${step}\nurl: ${page.url()}\nSPA: ${JSON.stringify(state, null, 2)}\n`
      + `error: ${err.stack || err}\n\nlast lines of demo.log:\n${tail(DEMO_LOG)}\n`;
    fs.writeFileSync(path.join(ARTIFACTS, 'failure.txt'), report);
    err.message = `step "${step}" failed (${page.url()}): ${err.message}\n`
      + `see ${path.relative(ROOT, ARTIFACTS)}/ (FAILED.png, failure.txt, demo.log); last lines of demo.log:\n`
      + tail(DEMO_LOG, 25);
    throw err;
  } finally {
    browserLog.end();
  }
});
