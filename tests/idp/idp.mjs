// A real OpenID Connect authorization server (panva/oidc-provider 8.x) for
// tokengate's tests and demo. Development-only: in-memory storage, a login form
// that accepts any login name with any password, fixed cookie keys.
//
// Env:
//   PORT                  listen port on 127.0.0.1 (default 0 = random)
//   IDP_CLIENTS           JSON array of client metadata (default: the demo client "tokengate")
//   IDP_ACCESS_TOKEN_TTL  access token lifetime in seconds (default 300)
//   IDP_TOKEN_DELAY_MS    test-only: delay every token-endpoint answer (default 0)
//   IDP_RESOURCES         JSON object {"<resource indicator>": "<space-separated scopes>"}: enables
//                         RFC 8707 resource indicators; each resource gets JWT access tokens with
//                         aud = the resource and only its own scopes (default: none, feature off)
//   IDP_EXCHANGE          JSON object {"<audience>": "<space-separated scopes>"}: registers an RFC 8693
//                         token-exchange grant (the provider's registerGrantType API) that trades
//                         a user's opaque access token for a JWT access token with aud = the
//                         audience and scopes among its own (default: none, grant not offered)
//   IDP_DPOP              "1": DPoP (RFC 9449) on: proofs are checked and tokens bound (cnf.jkt)
//   IDP_DPOP_NONCE        "1" (with IDP_DPOP): every proof must carry a server nonce (use_dpop_nonce)
//
// On listening, prints exactly one JSON line to stdout:
//   {"issuer":"http://127.0.0.1:PORT","port":PORT}
// Everything else (logs) goes to stderr. See README.md for the login recipe.

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const log = (...args) => console.error('[idp]', ...args);

function intEnv(name, dflt) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) {
    log(`invalid ${name}=${raw}`);
    process.exit(2);
  }
  return n;
}

const PORT = intEnv('PORT', 0);
const ACCESS_TOKEN_TTL = intEnv('IDP_ACCESS_TOKEN_TTL', 300);
// Test-only: answer token requests this much later (widens race windows on purpose).
const TOKEN_DELAY_MS = intEnv('IDP_TOKEN_DELAY_MS', 0);

const DEFAULT_CLIENTS = [{
  client_id: 'tokengate',
  client_secret: 'tokengate-demo-secret',
  redirect_uris: ['http://localhost:8080/oauth-callback'],
  post_logout_redirect_uris: ['http://localhost:8080/'],
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
}];

let clients = DEFAULT_CLIENTS;
if (process.env.IDP_CLIENTS) {
  try {
    clients = JSON.parse(process.env.IDP_CLIENTS);
    if (!Array.isArray(clients)) throw new Error('not a JSON array');
  } catch (err) {
    log(`invalid IDP_CLIENTS: ${err.message}`);
    process.exit(2);
  }
}

function jsonObjectEnv(name) {
  if (!process.env[name]) return {};
  try {
    const v = JSON.parse(process.env[name]);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object');
    return v;
  } catch (err) {
    log(`invalid ${name}: ${err.message}`);
    process.exit(2);
  }
  return {};
}

// Resource servers (APIs) for RFC 8707: indicator -> the scopes it knows.
const resources = jsonObjectEnv('IDP_RESOURCES');

// Token exchange (RFC 8693): audience -> the scopes it knows.
const exchangeAudiences = jsonObjectEnv('IDP_EXCHANGE');
const DPOP = process.env.IDP_DPOP === '1';
const DPOP_NONCE = process.env.IDP_DPOP_NONCE === '1';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

// A fresh RSA signing key per process (ID tokens are RS256 by default).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), use: 'sig', alg: 'RS256',
};

// login "alice" -> sub "alice", name "Alice", email "alice@example.com"
function accountClaims(login) {
  return {
    sub: login,
    name: login.charAt(0).toUpperCase() + login.slice(1),
    email: `${login}@example.com`,
    email_verified: true,
  };
}

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

const page = (title, body) => `<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<style>body{font-family:sans-serif;max-width:30em;margin:3em auto}button{margin:.3em}</style></head>
<body>
<h1>${escapeHtml(title)}</h1>
${body}
</body>
</html>`;

// ---- counters for GET /__stats ----
const stats = {
  grants: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
  revocations: 0,
  // every POST /token, successful or not
  token_requests: 0,
  // tokens actually found and revoked at the revocation endpoint, by kind
  revoked: { access_token: 0, refresh_token: 0, client_credentials: 0 },
};

async function start() {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(PORT, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingKey] },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() { return accountClaims(id); },
      };
    },
    responseTypes: ['code'],
    scopes: ['openid', 'profile', 'email', 'offline_access'],
    claims: {
      openid: ['sub'],
      profile: ['name'],
      email: ['email', 'email_verified'],
    },
    // put the scope-granted claims (name, email) into the ID token too
    conformIdTokenClaims: false,
    pkce: { methods: ['S256'], required: () => true },
    rotateRefreshToken: true,
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      userinfo: { enabled: true },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: Object.keys(resources).length > 0,
        // No resource at the token endpoint (with openid): a token for the userinfo endpoint,
        // as without the feature; a resource must be asked for explicitly.
        useGrantedResource: async () => false,
        async getResourceServerInfo(ctx, resourceIndicator) {
          const scope = resources[resourceIndicator];
          if (scope === undefined) throw new errors.InvalidTarget();
          return {
            scope,
            audience: resourceIndicator,
            accessTokenTTL: ACCESS_TOKEN_TTL,
            accessTokenFormat: 'jwt',
          };
        },
      },
      dPoP: {
        enabled: DPOP,
        nonceSecret: DPOP_NONCE ? randomBytes(32) : undefined,
        requireNonce: () => DPOP_NONCE,
      },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        // same form as the default page, without external resources
        async logoutSource(ctx, form) {
          ctx.body = page(`Do you want to sign-out from ${ctx.host}?`, `${form}
<button autofocus type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
<button type="submit" form="op.logoutForm">No, stay signed in</button>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Sign-out Success', '<p>Your sign-out was successful.</p>');
        },
      },
    },
    ttl: {
      AccessToken: ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      ClientCredentials: ACCESS_TOKEN_TTL,
      IdToken: 3600,
      RefreshToken: 24 * 3600,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    cookies: {
      // fixed development keys; never use outside tests/demo
      keys: ['tokengate-test-idp-cookie-key-1', 'tokengate-test-idp-cookie-key-2'],
      // plain http on 127.0.0.1: not Secure, and SameSite=Lax instead of the default
      // SameSite=None (which browsers reject without Secure)
      long: { signed: true, httpOnly: true, sameSite: 'lax', secure: false },
      short: { signed: true, httpOnly: true, sameSite: 'lax', secure: false },
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('oops! something went wrong', `<pre id="error">${escapeHtml(JSON.stringify(out, null, 2))}</pre>`);
    },
  });

  if (Object.keys(exchangeAudiences).length > 0) {
    // RFC 8693 §2: a user's access token (issued by us, to this client) for a JWT meant for one
    // known audience, with scopes among that audience's own.
    provider.registerGrantType(TOKEN_EXCHANGE, async (ctx, next) => {
      const { params, client } = ctx.oidc;
      if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
        throw new errors.InvalidRequest('subject_token_type must be an access token');
      }
      if (params.requested_token_type && params.requested_token_type !== ACCESS_TOKEN_TYPE) {
        throw new errors.InvalidRequest('only access tokens are issued');
      }
      const subject = await provider.AccessToken.find(params.subject_token);
      if (!subject || subject.clientId !== client.clientId) {
        throw new errors.InvalidGrant('subject_token is invalid, expired or not this client\'s');
      }
      const known = exchangeAudiences[params.audience];
      if (!params.audience || known === undefined) throw new errors.InvalidTarget('unknown audience');
      const allowed = new Set(known.split(' '));
      const asked = params.scope ? params.scope.split(' ') : [...allowed];
      const refused = asked.find((x) => !allowed.has(x));
      if (refused) throw new errors.InvalidScope('requested scope is not allowed', refused);
      const at = new provider.AccessToken({
        accountId: subject.accountId,
        client,
        grantId: subject.grantId,
        gty: 'token_exchange',
        scope: asked.join(' '),
      });
      at.resourceServer = new provider.ResourceServer(params.audience, {
        scope: known,
        audience: params.audience,
        accessTokenTTL: ACCESS_TOKEN_TTL,
        accessTokenFormat: 'jwt',
      });
      ctx.oidc.entity('AccessToken', at);
      const value = await at.save();
      ctx.body = {
        access_token: value,
        issued_token_type: ACCESS_TOKEN_TYPE,
        token_type: 'Bearer',
        expires_in: at.expiration,
        scope: at.scope,
      };
      await next();
    }, ['subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'scope']);
  }

  provider.on('grant.success', (ctx) => {
    const type = ctx.oidc.params.grant_type;
    stats.grants[type] = (stats.grants[type] || 0) + 1;
  });
  provider.on('server_error', (ctx, err) => log('server_error', err));
  provider.on('grant.error', (ctx, err) => log('grant.error', err.message, err.error_description || ''));
  provider.on('backchannel.error', (ctx, err, client) => log('backchannel.error', client.clientId, err.message));

  provider.use(async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/__stats') {
      ctx.body = stats;
      return;
    }
    if (ctx.method === 'POST' && ctx.path === '/token') stats.token_requests += 1;
    if (TOKEN_DELAY_MS > 0 && ctx.method === 'POST' && ctx.path === '/token') {
      await new Promise((resolve) => { setTimeout(resolve, TOKEN_DELAY_MS); });
    }
    await next();
    log(ctx.method, ctx.originalUrl.split('?')[0], ctx.status);
    if (ctx.method === 'POST' && ctx.path === '/token/revocation' && ctx.status === 200) {
      stats.revocations += 1;
      const entities = (ctx.oidc && ctx.oidc.entities) || {};
      if (entities.AccessToken) stats.revoked.access_token += 1;
      if (entities.RefreshToken) stats.revoked.refresh_token += 1;
      if (entities.ClientCredentials) stats.revoked.client_credentials += 1;
    }
    // the built-in dev interaction pages import a web font; keep the IdP fully offline
    if (typeof ctx.body === 'string' && ctx.response.is('html')) {
      ctx.body = ctx.body.replace(/@import url\(https:\/\/fonts\.googleapis\.com[^)]*\);/g, '');
    }
  });

  server.on('request', provider.callback());

  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
  log(`listening, issuer ${issuer}, clients: ${clients.map((c) => c.client_id).join(', ')}`);

  const shutdown = (sig) => {
    log(`${sig}, exiting`);
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

start().catch((err) => {
  log('failed to start:', err);
  process.exit(1);
});
