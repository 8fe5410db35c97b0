// The status API (/admin/backends, /admin/config, with and without an admin token) and the
// separate metrics listener (metrics.listen): what an operator reads, asserted on the wire.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import os from 'node:os';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startGateway,
  startMock,
  backendEntry,
  freePort,
  httpRequest,
  postJson,
  chatBody,
  openAIError,
} from './lib/harness.mjs';

let mock;

before(async () => {
  mock = await startMock({ name: 'a', models: ['m1'] });
});
beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

test('/admin/backends reports each backend live; /admin/config redacts secrets', { timeout: 30_000 }, async () => {
  const dead = await freePort();
  const gw = await startGateway({
    backends: [
      backendEntry(mock, { name: 'a', weight: 3, models: ['m1'] }),
      { url: `http://127.0.0.1:${dead}`, weight: 1, name: 'dead' },
    ],
    usage_hook: { enabled: false, url: 'http://127.0.0.1:9/usage', secret: 'hook-secret-value' },
  });
  // No token, but a loopback listener: nothing to warn about (elsewhere: a unit test).
  assert.doesNotMatch(gw.stderr + gw.stdout, /admin API has no token/);
  for (let i = 0; i < 4; ++i) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200);
  }
  const res = await httpRequest(`${gw.url}/admin/backends`);
  assert.equal(res.status, 200);
  assert.match(String(res.headers['content-type']), /application\/json/);
  const { backends } = JSON.parse(res.text());
  assert.equal(backends.length, 2);
  const a = backends.find((b) => b.name === 'a');
  assert.equal(a.url, mock.url);
  assert.equal(a.weight, 3);
  assert.equal(a.healthy, true);
  assert.equal(a.in_flight, 0);
  assert.equal(a.requests, 4, 'the four requests went to "a"');
  assert.ok(a.latency_avg_ms > 0);
  assert.deepEqual(a.models, ['m1']);
  for (const key of ['consecutive_failures', 'last_check', 'models_source']) assert.ok(key in a, key);

  const cfg = await httpRequest(`${gw.url}/admin/config`);
  assert.equal(cfg.status, 200);
  const text = cfg.text();
  assert.match(text, /backends:/);
  assert.match(text, /weight: 3/);
  assert.ok(!text.includes('hook-secret-value'), 'the webhook secret must be redacted');
  assert.match(text, /secret: <redacted>/);
});

test('with admin.token, /admin/* need the bearer token; LLM routes do not', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(mock, { name: 'a' })], admin: { token: 'adm-123456' } });
  for (const headers of [{}, { authorization: 'Bearer wrong-token' }, { authorization: 'adm-123456' }]) {
    const res = await httpRequest(`${gw.url}/admin/backends`, { headers });
    assert.equal(res.status, 401, JSON.stringify(headers));
    const e = openAIError(res);
    assert.equal(e.code, 'invalid_admin_token');
    assert.match(String(res.headers['www-authenticate']), /^Bearer realm="llmproxy admin"$/, 'a 401 says which scheme it wants');
  }
  const ok = await httpRequest(`${gw.url}/admin/config`, { headers: { authorization: 'Bearer adm-123456' } });
  assert.equal(ok.status, 200);
  assert.ok(!ok.text().includes('adm-123456'), 'the admin token itself is redacted');
  // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
  const lower = await httpRequest(`${gw.url}/admin/backends`, { headers: { authorization: 'bearer adm-123456' } });
  assert.equal(lower.status, 200, lower.text());
  const wrongCase = await httpRequest(`${gw.url}/admin/backends`, { headers: { authorization: 'Bearer ADM-123456' } });
  assert.equal(wrongCase.status, 401);
  const chat = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(chat.status, 200);
});

test('metrics.listen serves /metrics on its own address, and only there, with the probes', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(mock, { name: 'a' })], metrics: { listen: '127.0.0.1:0' } });
  const m = /metrics on (http:\/\/127\.0\.0\.1:\d+)\/metrics/.exec(gw.stdout);
  assert.ok(m, `no metrics address in: ${gw.stdout}`);
  const metricsUrl = m[1];
  const chat = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(chat.status, 200);
  const scraped = await httpRequest(`${metricsUrl}/metrics`);
  assert.equal(scraped.status, 200);
  assert.match(scraped.text(), /llmproxy_requests_total\{path="\/v1\/chat\/completions",stream="false",backend="a",status="200"\} 1/);
  // The main listener no longer serves /metrics; the metrics listener serves nothing else.
  const main = await httpRequest(`${gw.url}/metrics`);
  assert.equal(main.status, 404);
  openAIError(main);
  const other = await postJson(metricsUrl, '/v1/chat/completions', chatBody('m1'));
  assert.equal(other.status, 404);
  // The probes answer there too: an orchestrator can probe a port that client connections at
  // server.max_connections cannot crowd out.
  const health = await httpRequest(`${metricsUrl}/health`);
  assert.equal(health.status, 200);
  assert.equal(JSON.parse(health.text()).status, 'ok');
  const ready = await httpRequest(`${metricsUrl}/ready`);
  assert.equal(ready.status, 200);
  const admin = await httpRequest(`${metricsUrl}/admin/backends`);
  assert.equal(admin.status, 404);
});

// Without admin.token the admin API is the host's own: a client reaching the gateway through
// another address (the host's own non-loopback address here, delivered locally) gets 403.
const hostAddress = Object.values(os.networkInterfaces())
  .flat()
  .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
test('without admin.token, /admin/* answer loopback clients only: 403 admin_loopback_only to others', { timeout: 30_000, skip: !hostAddress && 'this host has no non-loopback IPv4 address' }, async () => {
  const gw = await startGateway({ listen: '0.0.0.0:0', backends: [backendEntry(mock, { name: 'a' })] });
  const local = await httpRequest(`http://127.0.0.1:${gw.port}/admin/backends`);
  assert.equal(local.status, 200, local.text());
  for (const [method, path] of [['GET', '/admin/backends'], ['GET', '/admin/config'], ['POST', '/admin/reload']]) {
    const res = await httpRequest(`http://${hostAddress}:${gw.port}${path}`, { method, body: method === 'POST' ? '' : undefined });
    assert.equal(res.status, 403, `${method} ${path}: ${res.text()}`);
    const e = openAIError(res);
    assert.equal(e.code, 'admin_loopback_only');
    assert.equal(e.type, 'permission_error');
  }
  // LLM routes are not admin routes: served to everyone.
  const chat = await postJson(`http://${hostAddress}:${gw.port}`, '/v1/chat/completions', chatBody());
  assert.equal(chat.status, 200, chat.text());
});
