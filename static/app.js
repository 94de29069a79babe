// tokengate demo SPA: no framework, no build step. The browser never sees a token;
// every call goes to tokengate with the session cookie (same-origin) and, where
// tokengate requires it, the CSRF header.
'use strict';

const CSRF = { 'X-CSRF': '1' };
const $ = (id) => document.getElementById(id);

// fetch against tokengate; returns { status, statusText, body } with body parsed as JSON
// when possible, else the raw text
async function call(method, path, headers = {}) {
  const res = await fetch(path, { method, headers, credentials: 'same-origin' });
  const text = await res.text();
  let body = text;
  try { body = text ? JSON.parse(text) : null; } catch { /* not JSON: keep the text */ }
  return { status: res.status, statusText: res.statusText, body };
}

function show(method, path, { status, statusText, body }) {
  const shown = typeof body === 'string' ? body : JSON.stringify(body, null, 2);
  $('output').textContent = `${method} ${path} → ${status} ${statusText}\n\n${shown ?? ''}`;
}

function showFailure(method, path, err) {
  $('output').textContent = `${method} ${path} failed: ${err.message}`;
}

// session expiry as /userinfo reports it: session.expires_at, epoch seconds
function expiryOf(info) {
  const raw = info.session?.expires_at;
  if (raw === undefined || raw === null) return null;
  const date = typeof raw === 'number' ? new Date(raw * 1000) : new Date(raw);
  return Number.isNaN(date.getTime()) ? String(raw) : date.toLocaleString();
}

async function loadUser() {
  let res;
  try {
    res = await call('GET', '/userinfo');
  } catch (err) {
    $('user').textContent = 'unknown (tokengate unreachable)';
    return;
  }
  if (res.status === 200 && res.body && typeof res.body === 'object') {
    const info = res.body;
    $('user').textContent = info.name || info.preferred_username || info.sub;
    $('sub').textContent = `sub: ${info.sub}${info.email ? ` · ${info.email}` : ''}`;
    const expiry = expiryOf(info);
    $('expiry').textContent = expiry ? `session expires: ${expiry}` : '';
    document.body.classList.add('logged-in');
  } else {
    $('user').textContent = 'not logged in';
    $('sub').textContent = '';
    $('expiry').textContent = '';
    document.body.classList.remove('logged-in');
  }
}

// tokengate sends login failures back to / as ?error=...&error_description=...
function showLoginError() {
  const params = new URLSearchParams(window.location.search);
  const error = params.get('error');
  if (!error) return;
  const description = params.get('error_description');
  const box = $('error');
  box.textContent = `Login failed: ${error}${description ? ` — ${description}` : ''}`;
  box.hidden = false;
  // drop the parameters so a reload does not show the message again
  window.history.replaceState(null, '', window.location.pathname);
}

// runs an action with its button disabled meanwhile
function onClick(id, action) {
  const button = $(id);
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
    }
  });
}

onClick('login', async () => {
  window.location.assign(`/login?return_to=${encodeURIComponent(window.location.pathname)}`);
});

onClick('call-api', async () => {
  try {
    show('GET', '/api/hello', await call('GET', '/api/hello', CSRF));
  } catch (err) {
    showFailure('GET', '/api/hello', err);
  }
});

onClick('refresh', async () => {
  try {
    show('POST', '/refreshtoken', await call('POST', '/refreshtoken', CSRF));
    await loadUser();
  } catch (err) {
    showFailure('POST', '/refreshtoken', err);
  }
});

onClick('logout', async () => {
  try {
    const res = await call('POST', '/logout', CSRF);
    show('POST', '/logout', res);
    const url = res.status === 200 && res.body && res.body.logout_url;
    if (typeof url === 'string' && /^https?:$/.test(new URL(url, window.location.href).protocol)) {
      window.location.assign(url);
      return;
    }
    await loadUser();
  } catch (err) {
    showFailure('POST', '/logout', err);
  }
});

showLoginError();
loadUser();
