// https:// upstreams: the gateway speaks TLS to the backend, verifies its certificate and host
// name by default (system store or upstream.ca_file), and relays streams over it unchanged.
// The fixture is a self-signed certificate for localhost/127.0.0.1, generated for these tests
// (openssl req -x509 -newkey rsa:2048 -days 36500 -subj /CN=localhost
//  -addext subjectAltName=DNS:localhost,IP:127.0.0.1).
import { test, after, afterEach, beforeEach, before } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanup, checkProcesses, trackTest, startGateway, postJson, chatBody, openAIError, httpRequest, toYaml, withTimeout } from './lib/harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CERT = path.join(HERE, 'fixtures', 'tls-cert.pem');
const KEY = path.join(HERE, 'fixtures', 'tls-key.pem');

let server;
let port;
let seen = 0;
let answer = null; // when set, answers the next POSTs instead of the normal response
const SSE = 'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"delta":{"content":"b"}}]}\n\ndata: [DONE]\n\n';

before(async () => {
  server = https.createServer({ cert: fs.readFileSync(CERT), key: fs.readFileSync(KEY) }, (req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      if (req.method === 'POST') seen++; // not the gateway's GET /v1/models discovery
      if (req.method === 'POST' && answer) return answer(req, res);
      const stream = JSON.parse(body || '{}').stream === true;
      if (stream) {
        res.writeHead(200, { 'Content-Type': 'text/event-stream' });
        res.end(SSE);
      } else {
        res.writeHead(200, {
          'Content-Type': 'application/json',
          'X-Saw-Host': req.headers.host ?? '',
          'X-Saw-SNI': String(req.socket.servername ?? false),
        });
        res.end('{"ok":"over tls"}');
      }
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = server.address().port;
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(async () => {
  await cleanup();
  server.closeAllConnections?.();
  await new Promise((resolve) => server.close(resolve));
});

test('https backend trusted through upstream.ca_file: non-stream and stream relayed byte for byte', async () => {
  const gw = await startGateway({
    upstream: { ca_file: CERT },
    backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }],
  });
  const before = seen;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text());
  assert.equal(res.text(), '{"ok":"over tls"}');
  assert.equal(res.headers['x-saw-host'], `localhost:${port}`);
  assert.equal(res.headers['x-saw-sni'], 'localhost');
  const sres = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }));
  assert.equal(sres.status, 200);
  assert.equal(sres.text(), SSE);
  assert.equal(seen - before, 2);
});

test('certificate verification is on by default: an untrusted backend is refused, never used', async () => {
  const gw = await startGateway({ backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }] });
  const before = seen;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 502, res.text());
  assert.equal(openAIError(res).code, 'upstream_error');
  // The answer says why the certificate was refused, not only that it was.
  assert.match(openAIError(res).message, /certificate verify failed.*: self.signed certificate/, res.text());
  assert.equal(seen - before, 0, 'the request must not be sent over an unverified connection');
});

test('an https backend addressed by IP is verified against the IP and sent no SNI (RFC 6066 names hosts only)', async () => {
  const gw = await startGateway({
    upstream: { ca_file: CERT },
    backends: [{ url: `https://127.0.0.1:${port}`, weight: 1, name: 'tls-ip' }],
  });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text());
  assert.equal(res.headers['x-saw-sni'], 'false');
});

test('a certificate for another host name is refused even when its CA is trusted', async () => {
  // The certificate names localhost and 127.0.0.1; a server on 127.0.0.2 presenting it is a
  // host the certificate does not name.
  let other = 0;
  const mismatch = https.createServer({ cert: fs.readFileSync(CERT), key: fs.readFileSync(KEY) }, (req, res) => {
    other++;
    res.end('{}');
  });
  await new Promise((resolve) => mismatch.listen(0, '127.0.0.2', resolve));
  try {
    const gw = await startGateway({
      upstream: { ca_file: CERT },
      backends: [{ url: `https://127.0.0.2:${mismatch.address().port}`, weight: 1, name: 'tls' }],
    });
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 502, res.text());
    assert.match(openAIError(res).message, /IP address mismatch/, res.text());
    assert.equal(other, 0, 'the request must not be sent to a host the certificate does not name');
  } finally {
    mismatch.closeAllConnections?.();
    await new Promise((resolve) => mismatch.close(resolve));
  }
});

test('upstream.tls_verify: false accepts the untrusted certificate', async () => {
  const gw = await startGateway({
    upstream: { tls_verify: false },
    backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }],
  });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text());
  assert.equal(res.text(), '{"ok":"over tls"}');
});

test('turning tls_verify on by reload: a connection opened unverified is not used again', async () => {
  const gw = await startGateway({
    server: { workers: 1 },
    upstream: { tls_verify: false },
    backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }],
  });
  // Answered over an unverified connection, which the worker keeps for the next request.
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  const cfg = structuredClone(gw.config);
  cfg.upstream.tls_verify = true;
  fs.writeFileSync(gw.configFile, toYaml(cfg));
  const reload = await httpRequest(`${gw.url}/admin/reload`, { method: 'POST', body: '' });
  assert.equal(reload.status, 200, reload.text());
  const before = seen;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 502, res.text());
  assert.match(openAIError(res).message, /certificate verify failed/, res.text());
  assert.equal(seen - before, 0, 'the request went over the unverified connection');
});

test('an interim answer then a dropped connection over TLS: the backend ran the request, not replayed', async () => {
  const gw = await startGateway({
    server: { workers: 1 },
    upstream: { ca_file: CERT },
    load_balancing: { max_retries: 2 },
    backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }],
  });
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  for (const stream of [false, true]) {
    const before = seen;
    answer = (req) => req.socket.write('HTTP/1.1 103 Early Hints\r\n\r\n', () => req.socket.destroy());
    try {
      const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream }));
      assert.equal(res.status, 502, res.text());
      assert.match(openAIError(res).message, /invalid response/, res.text());
    } finally {
      answer = null;
    }
    assert.equal(seen - before, 1, `the request was sent again (stream: ${stream})`);
  }
});

// A gateway with one pooled TLS backend (no retries, no health checks), and the backend's
// connections opened from now on.
async function pooledTlsGateway() {
  const gw = await startGateway({
    server: { workers: 1 },
    upstream: { ca_file: CERT },
    load_balancing: { max_retries: 0 },
    health_check: { enabled: false },
    backends: [{ url: `https://localhost:${port}`, weight: 1, name: 'tls' }],
  });
  const sockets = new Set();
  const track = (s) => sockets.add(s);
  server.on('secureConnection', track);
  return { gw, sockets, untrack: () => server.off('secureConnection', track) };
}

test('a pooled TLS connection the backend dropped without close_notify is replaced, not counted as a failure', async () => {
  const { gw, sockets, untrack } = await pooledTlsGateway();
  try {
    assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
    assert.ok(sockets.size > 0, 'the answer came over a new connection');
    // The backend drops the pooled connection at the TCP level: no TLS close_notify first (a
    // process killed, an idle timeout in a proxy between), which OpenSSL reads as truncation.
    for (const s of sockets) s.destroy();
    const before = seen;
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200, res.text());
    assert.equal(seen - before, 1);
    const metrics = (await httpRequest(`${gw.url}/metrics`)).text();
    assert.doesNotMatch(metrics, /^llmproxy_upstream_errors_total\{[^}]*backend="tls"[^}]*\} [1-9]/m, metrics);
    assert.match(metrics, /^llmproxy_retries_total 1$/m);
  } finally {
    untrack();
  }
});

test('a pooled TLS connection the backend closed (close_notify, then FIN) leaves the pool at once: never tried, no retry', async () => {
  const { gw, sockets, untrack } = await pooledTlsGateway();
  const keepAlive = server.keepAliveTimeout;
  server.keepAliveTimeout = 120_000; // the server's own idle cut must not close them first
  try {
    assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
    assert.ok(sockets.size > 0, 'the answer came over a new connection');
    // The backend's keep-alive timeout, as a TLS server ends a connection: close_notify, then
    // FIN. The alert's bytes wait in the gateway's socket in front of the FIN.
    // (A connection already closed is the gateway's model discovery: one request, then closed.)
    const open = [...sockets].filter((s) => !s.destroyed);
    const closed = open.map((s) => new Promise((resolve) => s.once('close', resolve)));
    for (const s of open) s.end();
    await withTimeout(Promise.all(closed), 10_000, 'the gateway closing the pooled connections the backend ended');
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200, res.text());
    const metrics = (await httpRequest(`${gw.url}/metrics`)).text();
    assert.match(metrics, /^llmproxy_retries_total 0$/m);
  } finally {
    server.keepAliveTimeout = keepAlive;
    untrack();
  }
});
