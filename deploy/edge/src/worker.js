/**
 * mobile-preprocessor — the Cloudflare Worker on route /api/mobile/* in front of the mcp-rag origin.
 *
 * Light preprocessing at the edge, so malformed or abusive mobile requests never reach the origin:
 *
 *   - routes: only /api/mobile/search and /api/mobile/documents/{uuid}; anything else → 404 JSON
 *   - methods: GET and HEAD (OPTIONS answers 204 with Allow); anything else → 405 JSON with Allow
 *   - size: a GET/HEAD that carries a body → 413 JSON; a URL over MAX_URL_BYTES → 414 JSON
 *   - search: q is NFC-normalised, control characters become spaces, whitespace is collapsed and
 *     trimmed; empty → 400; longer than MAX_QUERY_CHARS code points → 400 (rejected, never
 *     truncated: a cut query silently means something else); limit is an integer clamped to
 *     1..MAX_LIMIT (default DEFAULT_LIMIT), non-integers → 400; collection must match the origin's
 *     collection-name pattern → else 400; every other query parameter is dropped
 *   - documents: the id must be a UUID (→ else 400), forwarded in lower case
 *   - headers: the origin sees only Authorization (unchanged), Accept-Language, User-Agent,
 *     X-Request-Id and Accept: application/json — cookies and everything else are stripped
 *   - request id: a well-formed incoming X-Request-Id is kept, otherwise a UUID is generated; it is
 *     sent to the origin and returned on every response
 *   - cache: 200 search responses are kept CACHE_TTL_SECONDS in caches.default under a key made of
 *     the normalised search plus SHA-256(Authorization) — never the token itself, and a different
 *     token always gives a different key, so one caller's results are never served to another;
 *     responses carry X-Cache: HIT or MISS
 *   - origin errors pass through with their status and JSON body; an unreachable origin → 502 JSON,
 *     a slow one (ORIGIN_TIMEOUT_MS) → 504 JSON
 *
 * Configuration comes from [vars] in wrangler.toml; there are no secrets (the tokens are the callers').
 */

const SEARCH_PATH = "/api/mobile/search";
const DOCUMENT_PATH = /^\/api\/mobile\/documents\/([^/]+)$/;
const CACHE_KEY_PREFIX = "/api/mobile/__edge_cache/v1";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
/** The origin's rule (mcp_rag.service.COLLECTION_PATTERN). */
const COLLECTION = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const REQUEST_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$/;
const INTEGER = /^[+-]?\d+$/;
const CONTROL_CHARS = /[\u0000-\u001f\u007f-\u009f]/g;
const WHITESPACE = /\s+/gu;

const ALLOW = "GET, HEAD, OPTIONS";
/** A stray GET body up to this size is read and dropped so the 413 reaches the client. */
const DISCARD_BODY_BYTES = 64 * 1024;
/** Request headers the origin needs; every other header (Cookie included) stays at the edge. */
const FORWARDED_REQUEST_HEADERS = ["authorization", "accept-language", "user-agent"];
/** Response headers worth passing back from the origin. */
const PASSED_RESPONSE_HEADERS = ["cache-control", "www-authenticate", "retry-after", "content-language"];

const DEFAULTS = {
  CACHE_TTL_SECONDS: 30,
  MAX_QUERY_CHARS: 256,
  MAX_LIMIT: 10,
  DEFAULT_LIMIT: 5,
  MAX_URL_BYTES: 2048,
  ORIGIN_TIMEOUT_MS: 10000,
};

class EdgeError extends Error {
  constructor(status, error, message, headers = {}) {
    super(message);
    this.status = status;
    this.error = error;
    this.headers = headers;
  }
}

export default {
  async fetch(request, env, ctx) {
    const requestId = pickRequestId(request.headers.get("x-request-id"));
    let response;
    try {
      response = await handle(request, env ?? {}, ctx, requestId);
    } catch (err) {
      if (err instanceof EdgeError) {
        response = jsonError(err.status, err.error, err.message, err.headers);
      } else {
        console.error(JSON.stringify({ event: "edge_error", request_id: requestId, error: String(err?.stack ?? err) }));
        response = jsonError(500, "internal_error", "the edge worker failed on this request; retry later");
      }
    }
    response.headers.set("X-Request-Id", requestId);
    if (request.method === "HEAD" && response.body !== null) {
      return new Response(null, { status: response.status, headers: response.headers });
    }
    return response;
  },
};

async function handle(request, env, ctx, requestId) {
  const config = readConfig(env);
  if (new TextEncoder().encode(request.url).length > config.maxUrlBytes) {
    throw new EdgeError(414, "uri_too_long", `the request URL is limited to ${config.maxUrlBytes} bytes`);
  }
  const url = new URL(request.url);
  const route = matchRoute(url.pathname);
  if (route === null) {
    throw new EdgeError(404, "not_found",
      "no such mobile API route: use GET /api/mobile/search?q=... or GET /api/mobile/documents/{id}");
  }
  if (request.method === "OPTIONS") {
    return new Response(null, { status: 204, headers: { Allow: ALLOW } });
  }
  if (request.method !== "GET" && request.method !== "HEAD") {
    throw new EdgeError(405, "method_not_allowed", `${request.method} is not allowed here; use GET`, { Allow: ALLOW });
  }
  if (hasBody(request)) {
    await discardBody(request);
    throw new EdgeError(413, "payload_too_large", "GET requests to the mobile API carry no body");
  }

  const target = route.kind === "search"
    ? searchTarget(url.searchParams, config)
    : documentTarget(route.documentId);

  const forwarded = forwardedHeaders(request.headers, requestId);
  const cacheable = route.kind === "search" && config.cacheTtl > 0;
  const cacheKey = cacheable ? await searchCacheKey(url.origin, target, forwarded.get("authorization")) : null;

  if (cacheKey !== null) {
    const hit = await cacheMatch(cacheKey);
    if (hit !== null) {
      return clientResponse(200, await hit.text(), hit.headers, { route, cacheStatus: "HIT", config });
    }
  }

  const origin = await fetchOrigin(config, target, forwarded);
  const body = await origin.text();
  const json = isJson(origin.headers.get("content-type"));
  if (!json) {
    if (origin.status >= 400) {
      throw new EdgeError(origin.status, "origin_error", `the origin answered ${origin.status}`,
        pickHeaders(origin.headers, ["retry-after", "www-authenticate"]));
    }
    throw new EdgeError(502, "bad_gateway", `the origin sent a non-JSON response (${origin.status})`);
  }
  if (cacheKey !== null && origin.status === 200) {
    await cachePut(cacheKey, body, config.cacheTtl, ctx);
  }
  return clientResponse(origin.status, body, origin.headers, {
    route, cacheStatus: cacheKey !== null ? "MISS" : null, config,
  });
}

// --- configuration -------------------------------------------------------------------------

function readConfig(env) {
  const int = (name, lo, hi, fallback = DEFAULTS[name]) => {
    const raw = env[name];
    const value = typeof raw === "number" ? raw : Number.parseInt(String(raw ?? ""), 10);
    return Number.isFinite(value) ? Math.min(hi, Math.max(lo, Math.trunc(value))) : fallback;
  };
  let origin;
  try {
    origin = new URL(String(env.ORIGIN_URL ?? ""));
  } catch {
    origin = null;
  }
  if (origin === null || (origin.protocol !== "https:" && origin.protocol !== "http:")) {
    throw new EdgeError(500, "misconfigured", "the edge worker has no valid ORIGIN_URL");
  }
  const maxLimit = int("MAX_LIMIT", 1, 10);
  return {
    originBase: origin.origin + origin.pathname.replace(/\/+$/, ""),
    cacheTtl: int("CACHE_TTL_SECONDS", 0, 300),
    maxQueryChars: int("MAX_QUERY_CHARS", 1, 4000),
    maxLimit,
    defaultLimit: Math.min(maxLimit, int("DEFAULT_LIMIT", 1, 10)),
    maxUrlBytes: int("MAX_URL_BYTES", 256, 16384),
    originTimeoutMs: int("ORIGIN_TIMEOUT_MS", 100, 60000),
  };
}

// --- routing and validation ----------------------------------------------------------------

function matchRoute(pathname) {
  if (pathname === SEARCH_PATH) {
    return { kind: "search" };
  }
  const match = DOCUMENT_PATH.exec(pathname);
  return match === null ? null : { kind: "document", documentId: match[1] };
}

function hasBody(request) {
  const length = request.headers.get("content-length");
  if (length !== null && length.trim() !== "" && length.trim() !== "0") {
    return true;
  }
  return request.headers.has("transfer-encoding");
}

/**
 * Reads and drops up to DISCARD_BODY_BYTES of an unwanted body before the 413, so a client that
 * sent a small body gets the answer rather than a reset connection; a bigger body is cut off.
 */
async function discardBody(request) {
  if (request.body === null) {
    return;
  }
  const reader = request.body.getReader();
  let seen = 0;
  try {
    while (seen <= DISCARD_BODY_BYTES) {
      const { done, value } = await reader.read();
      if (done) {
        return;
      }
      seen += value.byteLength;
    }
    await reader.cancel();
  } catch {
    // the client went away: nothing to answer
  }
}

/** Normalises a search and returns the origin path + query it becomes (also the cache key's body). */
function searchTarget(params, config) {
  const q = normaliseQuery(params.get("q") ?? "");
  if (q === "") {
    throw new EdgeError(400, "bad_request", "q is required: the words to search for");
  }
  if ([...q].length > config.maxQueryChars) {
    throw new EdgeError(400, "bad_request", `q is limited to ${config.maxQueryChars} characters`);
  }
  const out = new URLSearchParams({ q });
  const collection = (params.get("collection") ?? "").trim();
  if (collection !== "") {
    if (!COLLECTION.test(collection)) {
      throw new EdgeError(400, "bad_request",
        "collection must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit");
    }
    out.set("collection", collection);
  }
  out.set("limit", String(clampLimit(params.get("limit"), config)));
  return `${SEARCH_PATH}?${out}`;
}

function normaliseQuery(raw) {
  return raw.normalize("NFC").replace(CONTROL_CHARS, " ").replace(WHITESPACE, " ").trim();
}

function clampLimit(raw, config) {
  const text = (raw ?? "").trim();
  if (text === "") {
    return config.defaultLimit;
  }
  if (!INTEGER.test(text)) {
    throw new EdgeError(400, "bad_request", `limit must be an integer (it is clamped to 1..${config.maxLimit})`);
  }
  return Math.min(config.maxLimit, Math.max(1, Number.parseInt(text, 10)));
}

function documentTarget(rawId) {
  if (!UUID.test(rawId)) {
    throw new EdgeError(400, "bad_request", "document ids are UUIDs like 3f2b8c1e-0000-4000-8000-0123456789ab");
  }
  return `/api/mobile/documents/${rawId.toLowerCase()}`;
}

function pickRequestId(incoming) {
  const value = (incoming ?? "").trim();
  return REQUEST_ID.test(value) ? value : crypto.randomUUID();
}

function forwardedHeaders(incoming, requestId) {
  const headers = new Headers();
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = incoming.get(name);
    if (value !== null) {
      headers.set(name, value);
    }
  }
  headers.set("accept", "application/json");
  headers.set("x-request-id", requestId);
  return headers;
}

// --- origin ----------------------------------------------------------------------------------

async function fetchOrigin(config, target, headers) {
  try {
    return await fetch(config.originBase + target, {
      method: "GET",
      headers,
      redirect: "manual",
      signal: AbortSignal.timeout(config.originTimeoutMs),
    });
  } catch (err) {
    if (err?.name === "TimeoutError" || err?.name === "AbortError") {
      throw new EdgeError(504, "gateway_timeout", `the origin did not answer within ${config.originTimeoutMs} ms`);
    }
    throw new EdgeError(502, "bad_gateway", "the origin could not be reached; retry later");
  }
}

function isJson(contentType) {
  const type = (contentType ?? "").split(";")[0].trim().toLowerCase();
  return type === "application/json" || type.endsWith("+json");
}

function pickHeaders(headers, names) {
  const out = {};
  for (const name of names) {
    const value = headers.get(name);
    if (value !== null) {
      out[name] = value;
    }
  }
  return out;
}

function clientResponse(status, body, sourceHeaders, { route, cacheStatus, config }) {
  const headers = new Headers(pickHeaders(sourceHeaders, PASSED_RESPONSE_HEADERS));
  headers.set("content-type", sourceHeaders.get("content-type") ?? "application/json");
  if (status === 200) {
    headers.set("vary", "Authorization");
    if (route.kind === "search") {
      headers.set("cache-control", `private, max-age=${config.cacheTtl}`);
    }
  } else if (!headers.has("cache-control")) {
    headers.set("cache-control", "no-store");
  }
  if (cacheStatus !== null) {
    headers.set("x-cache", cacheStatus);
  }
  return new Response(body, { status, headers });
}

function jsonError(status, error, message, extraHeaders = {}) {
  return new Response(JSON.stringify({ error, message }), {
    status,
    headers: { "content-type": "application/json", "cache-control": "no-store", ...extraHeaders },
  });
}

// --- cache -----------------------------------------------------------------------------------

/**
 * The cache key: this zone's origin, a private path under the worker's own route (a client asking
 * for it directly gets the worker's 404, never the entry), the caller's credential as a SHA-256
 * hex digest, then the normalised search. Same search + same Authorization → same key; a
 * different Authorization (another tenant, another key, none) → a different key.
 */
async function searchCacheKey(zoneOrigin, target, authorization) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(authorization ?? ""));
  const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  const search = target.slice(SEARCH_PATH.length); // "?q=...&limit=..."
  return new Request(`${zoneOrigin}${CACHE_KEY_PREFIX}/${hex}/search${search}`, { method: "GET" });
}

async function cacheMatch(key) {
  try {
    return (await caches.default.match(key)) ?? null;
  } catch (err) {
    console.warn(JSON.stringify({ event: "cache_match_failed", error: String(err) }));
    return null;
  }
}

async function cachePut(key, body, ttl, ctx) {
  const stored = new Response(body, {
    headers: { "content-type": "application/json", "cache-control": `public, max-age=${ttl}` },
  });
  // Awaited (not only waitUntil) so an immediate repeat from the same device finds the entry;
  // a failing cache never fails the request.
  const put = caches.default.put(key, stored).catch((err) => {
    console.warn(JSON.stringify({ event: "cache_put_failed", error: String(err) }));
  });
  ctx?.waitUntil?.(put);
  await put;
}
