// Tests of the mobile-preprocessor worker in the real workerd runtime (Miniflare), under `node --test`.
//
// Two origins:
//   - a small Node echo origin on 127.0.0.1 that records what reaches it (headers, URLs, a hit
//     counter): the edge rules, header stripping and the cache's origin-hit accounting;
//   - the REAL mcp-rag origin, when the Python harness (tests/test_edge_worker.py) provides it
//     through the environment: ORIGIN_URL, TOKEN_A, TOKEN_B (two tenants), TOKEN_READ (tenant A,
//     read scope only), TOKEN_WRITE_ONLY (tenant A, no read scope), SEARCH_QUERY (matches documents
//     of both tenants), DOCS_A / DOCS_B (comma-separated document ids of each tenant),
//     DOCS_A_MANUALS (tenant A's ids in collection "manuals"), DOC_A (one of tenant A's ids).
//     Without ORIGIN_URL those tests are skipped.
//
// The worker runs with the [vars] of wrangler.toml, ORIGIN_URL replaced.

import assert from "node:assert/strict";
import { createHash, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Miniflare } from "miniflare";

const scriptPath = fileURLToPath(new URL("../src/worker.js", import.meta.url));
const { compatibilityDate, vars: VARS } = readWranglerToml(fileURLToPath(new URL("../wrangler.toml", import.meta.url)));
const EDGE = "https://mcp-rag.example.com";
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ALLOWED_AT_ORIGIN = new Set([
  // what the worker forwards
  "authorization", "accept", "accept-language", "user-agent", "x-request-id",
  // what the runtime's fetch adds on its own
  "host", "connection", "accept-encoding", "cf-worker", "content-length",
]);

/** compatibility_date and the flat [vars] of wrangler.toml (KEY = "value" lines). */
function readWranglerToml(path) {
  const text = readFileSync(path, "utf8");
  const date = /^compatibility_date\s*=\s*"([^"]+)"/m.exec(text);
  assert.ok(date, "wrangler.toml has a compatibility_date");
  const vars = {};
  const section = /^\[vars\]\s*$([\s\S]*?)(?=^\[|(?![\s\S]))/m.exec(text);
  assert.ok(section, "wrangler.toml has [vars]");
  for (const match of section[1].matchAll(/^([A-Z_][A-Z0-9_]*)\s*=\s*"([^"]*)"/gm)) {
    vars[match[1]] = match[2];
  }
  return { compatibilityDate: date[1], vars };
}

function startWorker(originUrl, extraVars = {}) {
  return new Miniflare({
    modules: true,
    scriptPath,
    compatibilityDate,
    bindings: { ...VARS, ORIGIN_URL: originUrl, ...extraVars },
  });
}

function sha256Hex(text) {
  return createHash("sha256").update(text, "utf8").digest("hex");
}

function nonce() {
  return randomUUID().slice(0, 8);
}

async function json(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    assert.fail(`expected JSON, got ${response.status}: ${text}`);
  }
}

async function assertJsonError(response, status, error) {
  assert.equal(response.status, status, `status of ${response.url}`);
  assert.match(response.headers.get("content-type") ?? "", /^application\/json/);
  const body = await json(response);
  assert.deepEqual(Object.keys(body).sort(), ["error", "message"]);
  if (error !== undefined) {
    assert.equal(body.error, error);
  }
  assert.ok(body.message.length > 0);
  assert.match(response.headers.get("x-request-id") ?? "", UUID_RE);
  return body;
}

/** A raw HTTP/1.1 request to the Miniflare entry (fetch() cannot send a GET body). */
function rawRequest(base, path, { method = "GET", headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(new URL(path, base), { method, headers, agent: false }, (res) => {
      let data = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => { data += chunk; });
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on("error", reject);
    if (body !== undefined) {
      req.write(body);
    }
    req.end();
  });
}

// --- the echo origin -------------------------------------------------------------------------

class EchoOrigin {
  constructor() {
    this.requests = [];
    this.server = http.createServer((req, res) => this.answer(req, res));
  }

  get hits() {
    return this.requests.length;
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  async stop() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  last() {
    return this.requests.at(-1);
  }

  answer(req, res) {
    const url = new URL(req.url, "http://origin");
    this.requests.push({ method: req.method, url: req.url, headers: { ...req.headers } });
    const reply = (status, body, headers = {}) => {
      res.writeHead(status, { "content-type": "application/json", ...headers });
      res.end(typeof body === "string" ? body : JSON.stringify(body));
    };
    if (url.pathname === "/api/mobile/search") {
      const q = url.searchParams.get("q") ?? "";
      if (q.startsWith("slow")) {
        setTimeout(() => reply(200, { query: q, results: [] }), 3000);
        return;
      }
      if (q.startsWith("html500")) {
        res.writeHead(500, { "content-type": "text/html" });
        res.end("<html><body>Internal Server Error</body></html>");
        return;
      }
      if (q.startsWith("busy")) {
        reply(503, { error: "unavailable", message: "postgres: down" }, { "retry-after": "5" });
        return;
      }
      reply(200, { query: q, results: [], hit: this.hits }, {
        "cache-control": "private, max-age=30",
        "set-cookie": "origin_session=abc; Path=/",
        "x-internal-debug": "origin-only",
      });
      return;
    }
    if (url.pathname.startsWith("/api/mobile/documents/")) {
      reply(404, { error: "not_found", message: "no document with that id" });
      return;
    }
    reply(404, { error: "not_found", message: "echo origin: unknown path" });
  }
}

// --- edge rules, against the echo origin -----------------------------------------------------

describe("edge rules (echo origin)", () => {
  let origin;
  let mf;
  let entry;
  const auth = { authorization: "Bearer echo-token-0123456789" };
  const search = (query, init = {}) =>
    mf.dispatchFetch(`${EDGE}/api/mobile/search?${query}`, { ...init, headers: { ...auth, ...init.headers } });

  before(async () => {
    origin = await new EchoOrigin().start();
    mf = startWorker(origin.url, { ORIGIN_TIMEOUT_MS: "1000" });
    entry = await mf.ready;
  });

  after(async () => {
    await mf?.dispose();
    await origin?.stop();
  });

  test("the query is normalised before it reaches the origin; unknown parameters are dropped", async () => {
    const n = nonce();
    const response = await search(`q=${encodeURIComponent(`  Hello \t  World\n\u00a0${n} `)}&collection=docs&limit=7&debug=1&token=x`);
    assert.equal(response.status, 200);
    await response.text();
    const seen = new URL(origin.last().url, "http://origin");
    assert.equal(seen.pathname, "/api/mobile/search");
    assert.deepEqual([...seen.searchParams.keys()], ["q", "collection", "limit"]);
    assert.equal(seen.searchParams.get("q"), `Hello World ${n}`);
    assert.equal(seen.searchParams.get("collection"), "docs");
    assert.equal(seen.searchParams.get("limit"), "7");
  });

  test("control characters become spaces and Unicode is NFC-normalised", async () => {
    const n = nonce();
    const response = await search(`q=${encodeURIComponent(`cafe\u0301\u0000bar\u0007${n}`)}`);
    assert.equal(response.status, 200);
    await response.text();
    assert.equal(new URL(origin.last().url, "http://o").searchParams.get("q"), `caf\u00e9 bar ${n}`);
  });

  test("limit is clamped to 1..10, defaults to 5, and must be an integer", async () => {
    for (const [given, forwarded] of [["50", "10"], ["10", "10"], ["0", "1"], ["-3", "1"], ["3", "3"], [null, "5"],
      ["", "5"], ["99999999999999999999", "10"], ["+4", "4"]]) {
      const limit = given === null ? "" : `&limit=${encodeURIComponent(given)}`;
      const response = await search(`q=clamp+${nonce()}${limit}`);
      assert.equal(response.status, 200, `limit=${given}`);
      await response.text();
      assert.equal(new URL(origin.last().url, "http://o").searchParams.get("limit"), forwarded, `limit=${given}`);
    }
    for (const bad of ["abc", "2.5", "1e3", "5x"]) {
      const before = origin.hits;
      await assertJsonError(await search(`q=clamp&limit=${encodeURIComponent(bad)}`), 400, "bad_request");
      assert.equal(origin.hits, before, `limit=${bad} must not reach the origin`);
    }
  });

  test("an empty q is rejected at the edge (400) without reaching the origin", async () => {
    for (const query of ["", "q=", "q=%20%20%09%0A", "limit=3", "q=%00%01"]) {
      const before = origin.hits;
      const body = await assertJsonError(await search(query), 400, "bad_request");
      assert.match(body.message, /q is required/);
      assert.equal(origin.hits, before, `"${query}" must not reach the origin`);
    }
  });

  test("q longer than 256 characters after normalisation is rejected with 400; 256 passes", async () => {
    const before = origin.hits;
    const tooLong = await search(`q=${"a".repeat(257)}`);
    const body = await assertJsonError(tooLong, 400, "bad_request");
    assert.match(body.message, /256 characters/);
    assert.equal(origin.hits, before);

    const exact = "é".repeat(256); // 256 code points, 512 UTF-8 bytes
    const ok = await search(`q=${encodeURIComponent(exact)}`);
    assert.equal(ok.status, 200);
    await ok.text();
    assert.equal(new URL(origin.last().url, "http://o").searchParams.get("q"), exact);

    const spaced = `${"ab      ".repeat(80)}`; // 640 raw characters, 239 after collapsing
    const collapsed = await search(`q=${encodeURIComponent(spaced)}`);
    assert.equal(collapsed.status, 200);
    await collapsed.text();
    assert.equal(new URL(origin.last().url, "http://o").searchParams.get("q"), Array(80).fill("ab").join(" "));
  });

  test("a collection name must match the origin's pattern", async () => {
    for (const bad of ["../etc", "-leading", "has space", "a".repeat(65), "semi;colon", "ünï"]) {
      const before = origin.hits;
      await assertJsonError(await search(`q=x&collection=${encodeURIComponent(bad)}`), 400, "bad_request");
      assert.equal(origin.hits, before, `collection=${bad}`);
    }
    for (const good of ["manuals", "A.b-c_9", "a".repeat(64)]) {
      const response = await search(`q=coll+${nonce()}&collection=${good}`);
      assert.equal(response.status, 200, `collection=${good}`);
      await response.text();
    }
    const blank = await search(`q=coll+${nonce()}&collection=`);
    assert.equal(blank.status, 200);
    await blank.text();
    assert.equal(new URL(origin.last().url, "http://o").searchParams.has("collection"), false);
  });

  test("a document id must be a UUID; it is forwarded in lower case", async () => {
    for (const bad of ["not-a-uuid", "123", "3f2b8c1e-0000-4000-8000-0123456789abX", "3f2b8c1e00004000800001234567890a",
      "%27%20OR%201%3D1"]) {
      const before = origin.hits;
      await assertJsonError(await mf.dispatchFetch(`${EDGE}/api/mobile/documents/${bad}`, { headers: auth }), 400,
        "bad_request");
      assert.equal(origin.hits, before, `id ${bad}`);
    }
    const response = await mf.dispatchFetch(`${EDGE}/api/mobile/documents/3F2B8C1E-0000-4000-8000-0123456789AB`,
      { headers: auth });
    await assertJsonError(response, 404, "not_found"); // the echo origin's answer, passed through
    assert.equal(origin.last().url, "/api/mobile/documents/3f2b8c1e-0000-4000-8000-0123456789ab");
  });

  test("methods other than GET/HEAD/OPTIONS get 405 JSON with an Allow header", async () => {
    const before = origin.hits;
    for (const method of ["POST", "PUT", "PATCH", "DELETE"]) {
      for (const path of ["/api/mobile/search?q=x", "/api/mobile/documents/3f2b8c1e-0000-4000-8000-0123456789ab"]) {
        const response = await mf.dispatchFetch(`${EDGE}${path}`, {
          method, headers: auth, body: method === "DELETE" ? undefined : "{}",
        });
        await assertJsonError(response, 405, "method_not_allowed");
        assert.equal(response.headers.get("allow"), "GET, HEAD, OPTIONS");
      }
    }
    const options = await mf.dispatchFetch(`${EDGE}/api/mobile/search`, { method: "OPTIONS" });
    assert.equal(options.status, 204);
    assert.equal(options.headers.get("allow"), "GET, HEAD, OPTIONS");
    assert.equal(origin.hits, before, "none of these reach the origin");
  });

  test("HEAD answers like GET without a body", async () => {
    const q = `head+${nonce()}`;
    const response = await search(`q=${q}`, { method: "HEAD" });
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "");
    assert.equal(response.headers.get("x-cache"), "MISS");
    assert.equal(origin.last().method, "GET");
  });

  test("unknown paths get 404 JSON without reaching the origin", async () => {
    const before = origin.hits;
    for (const path of ["/api/mobile/", "/api/mobile", "/api/mobile/openapi.json", "/api/mobile/searchx?q=x",
      "/api/mobile/search/?q=x", "/api/mobile/documents/", "/api/mobile/documents/a/b", "/api/other", "/"]) {
      await assertJsonError(await mf.dispatchFetch(`${EDGE}${path}`, { headers: auth }), 404, "not_found");
      await assertJsonError(await mf.dispatchFetch(`${EDGE}${path}`, { method: "POST", headers: auth }), 404);
    }
    assert.equal(origin.hits, before);
  });

  test("a GET with a body gets 413, an over-long URL 414, before the origin", async () => {
    const before = origin.hits;
    const withLength = await rawRequest(entry, "/api/mobile/search?q=x", {
      headers: { ...auth, "content-type": "application/json", "content-length": "11" }, body: '{"q":"big"}',
    });
    assert.equal(withLength.status, 413);
    assert.equal(JSON.parse(withLength.body).error, "payload_too_large");
    assert.match(withLength.headers["x-request-id"], UUID_RE);

    const chunked = await rawRequest(entry, "/api/mobile/search?q=x", {
      headers: { ...auth, "transfer-encoding": "chunked" }, body: "x".repeat(1000),
    });
    assert.equal(chunked.status, 413);

    // a big body is cut off after 64 KiB: the client sees the 413 or a reset connection
    const big = await rawRequest(entry, "/api/mobile/search?q=x", {
      headers: { ...auth, "content-length": "1000000" }, body: "x".repeat(1000000),
    }).catch((err) => ({ status: err.code }));
    assert.ok([413, "ECONNRESET", "EPIPE"].includes(big.status), `big body: ${big.status}`);

    const emptyBody = await rawRequest(entry, `/api/mobile/search?q=empty+${nonce()}`, {
      headers: { ...auth, "content-length": "0" },
    });
    assert.equal(emptyBody.status, 200, "content-length: 0 is not a body");

    const hitsAfterEmpty = origin.hits;
    assert.equal(hitsAfterEmpty, before + 1);
    const longUrl = await search(`q=x&pad=${"p".repeat(2100)}`);
    const body = await assertJsonError(longUrl, 414, "uri_too_long");
    assert.match(body.message, /2048 bytes/);
    assert.equal(origin.hits, hitsAfterEmpty);
  });

  test("cookies and every header the origin does not need are stripped; Authorization is forwarded unchanged",
    async () => {
      const authorization = "Bearer AbC.def-123_456~XYZ/+=";
      const response = await mf.dispatchFetch(`${EDGE}/api/mobile/search?q=strip+${nonce()}`, {
        headers: {
          authorization,
          cookie: "session=secret; theme=dark",
          "accept-language": "de-CH, en;q=0.5",
          "user-agent": "MobileApp/3.1 (iOS 18)",
          "x-api-key": "should-not-pass",
          "x-forwarded-for": "203.0.113.9",
          referer: "https://evil.example/",
          origin: "https://evil.example",
          "x-custom-debug": "1",
          "proxy-authorization": "Basic Zm9vOmJhcg==",
        },
      });
      assert.equal(response.status, 200);
      await response.text();
      const seen = origin.last().headers;
      assert.equal(seen.authorization, authorization);
      assert.equal(seen["accept-language"], "de-CH, en;q=0.5");
      assert.equal(seen["user-agent"], "MobileApp/3.1 (iOS 18)");
      assert.equal(seen.accept, "application/json");
      assert.equal(seen.cookie, undefined);
      const unexpected = Object.keys(seen).filter((name) => !ALLOWED_AT_ORIGIN.has(name));
      assert.deepEqual(unexpected, [], `headers that reached the origin: ${JSON.stringify(seen)}`);
      // and nothing origin-internal comes back
      assert.equal(response.headers.get("set-cookie"), null);
      assert.equal(response.headers.get("x-internal-debug"), null);
    });

  test("X-Request-Id: a valid incoming one is kept, anything else is replaced by a UUID", async () => {
    const keep = `req-${randomUUID()}`;
    let response = await search(`q=rid+${nonce()}`, { headers: { "x-request-id": keep } });
    await response.text();
    assert.equal(response.headers.get("x-request-id"), keep);
    assert.equal(origin.last().headers["x-request-id"], keep);

    for (const bad of ["short", "has spaces in it", "x".repeat(200), "<script>alert(1)</script>", null]) {
      response = await search(`q=rid+${nonce()}`, { headers: bad === null ? {} : { "x-request-id": bad } });
      await response.text();
      const id = response.headers.get("x-request-id");
      assert.match(id, UUID_RE, `replacing ${bad}`);
      assert.equal(origin.last().headers["x-request-id"], id);
    }
    // the worker's own errors carry one too
    const error = await mf.dispatchFetch(`${EDGE}/api/mobile/nope`, { headers: { "x-request-id": keep } });
    await error.text();
    assert.equal(error.headers.get("x-request-id"), keep);
  });

  test("a repeated search is served from the edge cache without reaching the origin", async () => {
    const q = `cached+${nonce()}`;
    const first = await search(`q=${q}&limit=3`);
    assert.equal(first.headers.get("x-cache"), "MISS");
    const firstBody = await first.text();
    const hits = origin.hits;

    // same search after normalisation: extra whitespace, reordered and unknown parameters
    for (const variant of [`q=${q}&limit=3`, `limit=3&q=%20%20${q}%20&utm=1`]) {
      const again = await search(variant);
      assert.equal(again.status, 200);
      assert.equal(again.headers.get("x-cache"), "HIT", variant);
      assert.equal(again.headers.get("cache-control"), "private, max-age=30");
      assert.equal(await again.text(), firstBody);
    }
    assert.equal(origin.hits, hits, "the origin was not asked again");

    const otherLimit = await search(`q=${q}&limit=4`);
    assert.equal(otherLimit.headers.get("x-cache"), "MISS");
    await otherLimit.text();
    assert.equal(origin.hits, hits + 1);
  });

  test("the cache key holds SHA-256(Authorization), never the token; another token misses", async () => {
    const q = `keyed+${nonce()}`;
    const tokenA = "Bearer tenant-a-token-0123456789";
    const tokenB = "Bearer tenant-b-token-0123456789";
    const a = await search(`q=${q}`, { headers: { authorization: tokenA } });
    assert.equal(a.headers.get("x-cache"), "MISS");
    await a.text();
    const hits = origin.hits;

    const b = await search(`q=${q}`, { headers: { authorization: tokenB } });
    assert.equal(b.headers.get("x-cache"), "MISS", "token B must not get token A's cached answer");
    await b.text();
    assert.equal(origin.hits, hits + 1);
    assert.equal(origin.last().headers.authorization, tokenB);

    const none = await mf.dispatchFetch(`${EDGE}/api/mobile/search?q=${q}`);
    assert.equal(none.headers.get("x-cache"), "MISS", "no token must not get a cached answer");
    await none.text();
    assert.equal(origin.hits, hits + 2);

    const cache = (await mf.getCaches()).default;
    const keyFor = (secret) => `${EDGE}/api/mobile/__edge_cache/v1/${secret}/search?q=${q}&limit=5`;
    const entry = await cache.match(keyFor(sha256Hex(tokenA)));
    assert.ok(entry, "the entry is keyed by the SHA-256 hex of the Authorization header");
    await entry.text();
    assert.equal(await cache.match(keyFor(encodeURIComponent(tokenA))), undefined);
    assert.equal(await cache.match(keyFor(tokenA.replace(/ /g, "%20"))), undefined);

    // the private key path is not reachable from outside: the worker answers it with 404
    const probe = await mf.dispatchFetch(keyFor(sha256Hex(tokenA)), { headers: { authorization: tokenA } });
    await assertJsonError(probe, 404, "not_found");
  });

  test("errors are not cached and pass through with their status and JSON body", async () => {
    const q = `busy+${nonce()}`;
    for (let i = 0; i < 2; i++) {
      const before = origin.hits;
      const response = await search(`q=${q}`);
      const body = await assertJsonError(response, 503, "unavailable");
      assert.equal(body.message, "postgres: down");
      assert.equal(response.headers.get("retry-after"), "5");
      assert.equal(response.headers.get("x-cache"), "MISS");
      assert.equal(origin.hits, before + 1);
    }
  });

  test("a non-JSON origin error keeps its status with a JSON body", async () => {
    const body = await assertJsonError(await search(`q=html500+${nonce()}`), 500, "origin_error");
    assert.match(body.message, /500/);
  });

  test("a slow origin gets 504 JSON after ORIGIN_TIMEOUT_MS", async () => {
    const started = Date.now();
    await assertJsonError(await search(`q=slow+${nonce()}`), 504, "gateway_timeout");
    assert.ok(Date.now() - started < 2900, "the worker gave up before the origin answered");
  });
});

describe("origin unreachable", () => {
  let mf;
  before(async () => {
    const closed = http.createServer();
    await new Promise((resolve) => closed.listen(0, "127.0.0.1", resolve));
    const port = closed.address().port;
    await new Promise((resolve) => closed.close(resolve));
    mf = startWorker(`http://127.0.0.1:${port}`);
  });
  after(async () => mf?.dispose());

  test("502 JSON when the origin cannot be reached", async () => {
    const response = await mf.dispatchFetch(`${EDGE}/api/mobile/search?q=anything`);
    await assertJsonError(response, 502, "bad_gateway");
  });

  test("500 JSON when ORIGIN_URL is not a URL", async () => {
    await mf.setOptions({ modules: true, scriptPath, compatibilityDate, bindings: { ...VARS, ORIGIN_URL: "nope" } });
    await assertJsonError(await mf.dispatchFetch(`${EDGE}/api/mobile/search?q=anything`), 500, "misconfigured");
  });
});

// --- against the real mcp-rag origin ----------------------------------------------------------

const REAL = process.env.ORIGIN_URL;
const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is set by the harness`);
  return value;
};
const ids = (name) => new Set(env(name).split(",").filter(Boolean));

describe("against the real mcp-rag origin", { skip: REAL ? false : "ORIGIN_URL not set (run tests/test_edge_worker.py)" },
  () => {
    let mf;
    const bearer = (name) => ({ authorization: `Bearer ${env(name)}` });
    const get = (path, headers = {}) => mf.dispatchFetch(`${EDGE}${path}`, { headers });
    const searchPath = (extra = "") => `/api/mobile/search?q=${encodeURIComponent(env("SEARCH_QUERY"))}${extra}`;

    before(async () => {
      mf = startWorker(REAL);
      await mf.ready;
    });
    after(async () => mf?.dispose());

    test("a search returns the compact result of the caller's tenant", async () => {
      const response = await get(searchPath("&limit=3"), bearer("TOKEN_A"));
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("x-cache"), "MISS");
      assert.match(response.headers.get("x-request-id"), UUID_RE);
      const body = await json(response);
      assert.deepEqual(Object.keys(body).sort(), ["query", "results"]);
      assert.equal(body.query, env("SEARCH_QUERY"));
      assert.ok(body.results.length >= 1 && body.results.length <= 3, `${body.results.length} results`);
      const tenantA = ids("DOCS_A");
      for (const result of body.results) {
        assert.deepEqual(Object.keys(result).sort(), ["document_id", "score", "snippet", "source", "title"]);
        assert.ok(tenantA.has(result.document_id), `${result.document_id} belongs to tenant A`);
        assert.ok(result.snippet.length > 0 && result.snippet.length <= 162, `snippet of ${result.snippet.length}`);
        assert.equal(typeof result.score, "number");
      }
    });

    test("the cache serves the repeat (HIT, same body)", async () => {
      const path = searchPath("&limit=2");
      const first = await get(path, bearer("TOKEN_A"));
      assert.equal(first.headers.get("x-cache"), "MISS");
      const firstBody = await first.text();
      const again = await get(path.replace("&limit=2", "&limit=02&x=1"), bearer("TOKEN_A"));
      assert.equal(again.headers.get("x-cache"), "HIT");
      assert.equal(await again.text(), firstBody);
    });

    test("tenant B never gets tenant A's cached results", async () => {
      const path = searchPath("&limit=10");
      const a = await get(path, bearer("TOKEN_A"));
      const aBody = await json(a);
      assert.equal((await json(await get(path, bearer("TOKEN_A")))).results.length, aBody.results.length);

      const b = await get(path, bearer("TOKEN_B"));
      assert.equal(b.status, 200);
      assert.equal(b.headers.get("x-cache"), "MISS");
      const bBody = await json(b);
      assert.ok(bBody.results.length >= 1, "tenant B has its own matching documents");
      const tenantA = ids("DOCS_A");
      const tenantB = ids("DOCS_B");
      for (const result of bBody.results) {
        assert.ok(tenantB.has(result.document_id), `${result.document_id} belongs to tenant B`);
        assert.ok(!tenantA.has(result.document_id));
      }
      const bAgain = await get(path, bearer("TOKEN_B"));
      assert.equal(bAgain.headers.get("x-cache"), "HIT");
      assert.deepEqual(await json(bAgain), bBody);
    });

    test("limit=50 is clamped at the edge: the origin answers (it rejects > 10) with at most 10", async () => {
      const q = encodeURIComponent(`${env("SEARCH_QUERY")} ${nonce()}`); // a fresh cache key
      const response = await get(`/api/mobile/search?q=${q}&limit=50`, bearer("TOKEN_B"));
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("x-cache"), "MISS");
      const body = await json(response);
      assert.ok(body.results.length <= 10);
    });

    test("a collection narrows the search; an unknown one finds nothing", async () => {
      const manuals = ids("DOCS_A_MANUALS");
      const response = await get(searchPath("&collection=manuals&limit=10"), bearer("TOKEN_A"));
      assert.equal(response.status, 200);
      const body = await json(response);
      assert.ok(body.results.length >= 1);
      for (const result of body.results) {
        assert.ok(manuals.has(result.document_id), `${result.document_id} is in manuals`);
      }
      const none = await get(searchPath("&collection=no-such-collection"), bearer("TOKEN_A"));
      assert.equal(none.status, 200);
      assert.deepEqual((await json(none)).results, []);
    });

    test("a wrong or missing token gets the origin's 401 (not cached)", async () => {
      for (const headers of [{ authorization: "Bearer wrong-token-0123456789abcdef" }, {}, { authorization: "Basic eDp5" }]) {
        for (let i = 0; i < 2; i++) {
          const response = await get(searchPath(), headers);
          const body = await assertJsonError(response, 401, "unauthorized");
          assert.match(body.message, /Bearer/);
          assert.match(response.headers.get("www-authenticate") ?? "", /^Bearer/);
          assert.equal(response.headers.get("x-cache"), "MISS");
        }
      }
    });

    test("a read-only key can search; a key without the read scope gets the origin's 403", async () => {
      const read = await get(searchPath("&limit=1"), bearer("TOKEN_READ"));
      assert.equal(read.status, 200);
      assert.equal(read.headers.get("x-cache"), "MISS", "another key of the same tenant has its own cache entries");
      const body = await json(read);
      assert.ok(ids("DOCS_A").has(body.results[0].document_id));

      await assertJsonError(await get(searchPath("&limit=1"), bearer("TOKEN_WRITE_ONLY")), 403, "forbidden");
    });

    test("a document comes back compact; another tenant's id and an unknown id get the origin's 404", async () => {
      const id = env("DOC_A");
      const response = await get(`/api/mobile/documents/${id.toUpperCase()}`, bearer("TOKEN_A"));
      assert.equal(response.status, 200);
      const body = await json(response);
      assert.deepEqual(Object.keys(body).sort(), ["collection", "document_id", "excerpt", "source", "title"]);
      assert.equal(body.document_id, id);
      assert.ok(body.excerpt.length > 0 && body.excerpt.length <= 601);

      await assertJsonError(await get(`/api/mobile/documents/${id}`, bearer("TOKEN_B")), 404, "not_found");
      await assertJsonError(await get(`/api/mobile/documents/${randomUUID()}`, bearer("TOKEN_A")), 404, "not_found");
      await assertJsonError(await get(`/api/mobile/documents/${id}`), 401, "unauthorized");
    });

    test("the worker's own rejections never reach the real origin's auth", async () => {
      // no token and an invalid request: the edge answers 400, not the origin's 401
      await assertJsonError(await get("/api/mobile/search?q=%20"), 400, "bad_request");
      await assertJsonError(await get("/api/mobile/documents/nope"), 400, "bad_request");
    });

    test("a caller's request id is carried through", async () => {
      const requestId = `mobile-${randomUUID()}`;
      const response = await get(searchPath(`&n=${nonce()}`), { ...bearer("TOKEN_A"), "x-request-id": requestId });
      assert.equal(response.status, 200);
      await response.text();
      assert.equal(response.headers.get("x-request-id"), requestId);
    });
  });
