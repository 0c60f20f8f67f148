// A real OpenID provider (npm oidc-provider) on 127.0.0.1 for tests/test_oauth.py.
//
// Configured from the environment:
//   OIDC_PORT         port to listen on (127.0.0.1 only)
//   OIDC_RESOURCES    comma-separated resource URLs it issues access tokens for (RFC 8707)
//   OIDC_JWKS_FILE    a JSON file {"keys": [private JWKs]}: the first RS256 key signs
//   OIDC_CLIENTS_FILE a JSON file [client metadata] registered at start (optional)
//
// Access tokens: client credentials grant, audience = the requested resource, scopes rag:read
// and rag:write as far as the client's registered `scope` allows, the client's `tenant`
// metadata as the `tenant` claim; JWT (RS256) unless the client registered
// `token_format: "opaque"` (then only introspection can tell what they carry).
// Dynamic client registration is open at /reg. GET /test/counts answers how often the JWKS
// and the introspection endpoint were asked (the tests check the resource server's caching).
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const issuer = `http://127.0.0.1:${port}`;
const resources = new Set((process.env.OIDC_RESOURCES || '').split(',').filter(Boolean));
const jwks = JSON.parse(readFileSync(process.env.OIDC_JWKS_FILE, 'utf8'));
const clients = process.env.OIDC_CLIENTS_FILE ? JSON.parse(readFileSync(process.env.OIDC_CLIENTS_FILE, 'utf8')) : [];
const SCOPES = ['rag:read', 'rag:write'];

const provider = new Provider(issuer, {
  jwks,
  clients,
  scopes: ['openid', ...SCOPES],
  extraClientMetadata: {
    properties: ['tenant', 'token_format', 'token_ttl'],
    validator(ctx, key, value) {
      if (key === 'token_format' && value !== undefined && !['jwt', 'opaque'].includes(value)) {
        throw new errors.InvalidClientMetadata('token_format must be jwt or opaque');
      }
    },
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    registration: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? [...resources][0],
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, resourceIndicator, client) {
        if (!resources.has(resourceIndicator)) {
          throw new errors.InvalidTarget();
        }
        const format = client.token_format === 'opaque' ? 'opaque' : 'jwt';
        return {
          scope: SCOPES.join(' '),
          audience: resourceIndicator,
          accessTokenTTL: client.token_ttl ?? 3600,
          accessTokenFormat: format,
          ...(format === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
        };
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    const client = await provider.Client.find(token.clientId);
    return client?.tenant ? { tenant: client.tenant } : undefined;
  },
});

const counts = { jwks: 0, introspection: 0 };
const handle = provider.callback();

http
  .createServer((req, res) => {
    if (req.url === '/test/counts') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(counts));
      return;
    }
    if (req.url === '/jwks') counts.jwks += 1;
    if (req.url.startsWith('/token/introspection')) counts.introspection += 1;
    handle(req, res);
  })
  .listen(port, '127.0.0.1', () => {
    process.stderr.write(`oidc-provider listening on ${issuer}\n`);
  });
