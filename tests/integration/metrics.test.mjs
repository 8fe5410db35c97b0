// /metrics: a valid Prometheus exposition (checked by promtool, from Debian's prometheus
// package) whose counters, read back after known traffic, equal that traffic, summed over all
// worker threads.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
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
  openStream,
  readAll,
  waitUntil,
} from './lib/harness.mjs';
import { metricSum } from './lib/usage.mjs';

let mock;
let gw;

before(async () => {
  mock = await startMock({ name: 'a', models: ['m1'] });
  const deadPort = await freePort();
  gw = await startGateway({
    server: { workers: 2 },
    load_balancing: { max_retries: 1 },
    backends: [
      backendEntry(mock, { name: 'a', weight: 1 }),
      // Nothing listens here: requests routed to it are retried on `a` (connect errors).
      { url: `http://127.0.0.1:${deadPort}`, weight: 1, name: 'dead' },
    ],
  });
});
beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

async function scrape() {
  const res = await httpRequest(`${gw.url}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/);
  return res.text();
}

// Value of one sample, by name and exact label set ({} for none); 0 when absent.
function sample(text, name, labels = {}) {
  const want = Object.entries(labels)
    .map(([k, v]) => `${k}="${v}"`)
    .join(',');
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const got = (m[2] ?? '')
      .split(/,(?=[a-zA-Z_]+=")/)
      .filter(Boolean)
      .sort()
      .join(',');
    const wanted = want.split(/,(?=[a-zA-Z_]+=")/).filter(Boolean).sort().join(',');
    if (got === wanted) return Number(m[3]);
  }
  return 0;
}

test('the exposition passes promtool; its only finding is the original llmproxy_latency_ms name', async () => {
  await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  const text = await scrape();
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  assert.ok(r.error === undefined, `promtool could not run: ${r.error}`);
  const findings = `${r.stdout}${r.stderr}`.split('\n').filter((l) => l.trim() !== '');
  assert.deepEqual(findings, ['llmproxy_latency_ms metric names should not contain abbreviated units']);
});

test('counters read back after known traffic equal that traffic', async () => {
  const before = await scrape();
  const chat = { path: '/v1/chat/completions', stream: 'false', backend: 'a', status: '200' };
  const chatStream = { ...chat, stream: 'true' };
  const notFound = { path: 'other', stream: 'false', backend: 'none', status: '404' };
  const badJson = { path: '/v1/chat/completions', stream: 'false', backend: 'none', status: '400' };

  for (let i = 0; i < 12; i++) assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  for (let i = 0; i < 4; i++) {
    const { res } = await openStream(`${gw.url}/v1/chat/completions`, {
      body: JSON.stringify(chatBody('m1', { stream: true })),
      // Events 2 ms apart, so each reaches the gateway alone (events that arrive together leave
      // in one write, and a gap is measured between writes).
      headers: { 'content-type': 'application/json', 'x-mock-tokens': '5', 'x-mock-delay-ms': '2' },
    });
    assert.equal(res.statusCode, 200);
    await readAll(res);
  }
  // Streams the backend refuses (a fast 400, a 429): no first token, so no TTFT observation.
  for (const status of [400, 429]) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-mock-status': String(status) } });
    assert.equal(res.status, status);
  }
  for (let i = 0; i < 3; i++) assert.equal((await httpRequest(`${gw.url}/nope`)).status, 404);
  for (let i = 0; i < 2; i++) {
    const res = await httpRequest(`${gw.url}/v1/chat/completions`, { method: 'POST', body: '{bad', headers: { 'content-type': 'application/json' } });
    assert.equal(res.status, 400);
  }
  // A request is counted once its answer is written: the last answer can reach this client a
  // moment before the gateway counts it, so read until the counts arrive (or time out).
  let after;
  const delta = (name, labels) => sample(after, name, labels) - sample(before, name, labels);
  await waitUntil(
    async () => {
      after = await scrape();
      return (
        delta('llmproxy_requests_total', chat) >= 12 &&
        delta('llmproxy_requests_total', chatStream) >= 4 &&
        delta('llmproxy_requests_total', notFound) >= 3 &&
        delta('llmproxy_requests_total', badJson) >= 2 &&
        delta('llmproxy_requests_total', { ...chatStream, status: '429' }) >= 1
      );
    },
    { timeout: 10_000, what: 'the request counters to count the traffic' },
  );
  assert.equal(delta('llmproxy_requests_total', chat), 12);
  assert.equal(delta('llmproxy_requests_total', chatStream), 4);
  assert.equal(delta('llmproxy_requests_total', notFound), 3);
  assert.equal(delta('llmproxy_requests_total', badJson), 2);
  // Nothing is ever answered by the dead backend: it only produces connect errors and retries.
  assert.equal(delta('llmproxy_requests_total', { ...chat, backend: 'dead' }), 0);
  const connectErrors = delta('llmproxy_upstream_errors_total', { backend: 'dead', kind: 'connect' });
  assert.equal(delta('llmproxy_retries_total', {}), connectErrors);
  assert.ok(connectErrors >= 1, 'round robin over a dead and a live backend sends some requests to the dead one');
  // One latency observation per request counted (the scrapes' own included).
  const counted = metricSum(after, 'llmproxy_requests_total') - metricSum(before, 'llmproxy_requests_total');
  assert.ok(counted >= 12 + 4 + 2 + 3 + 2 + 1, `requests counted: ${counted}`);
  assert.equal(delta('llmproxy_latency_ms_count', {}), counted);
  assert.equal(delta('llmproxy_request_duration_seconds_count', {}), counted);
  assert.equal(delta('llmproxy_time_to_first_token_seconds_count', { backend: 'a' }), 4);
  // Buckets reach 20 minutes: long generations do not all land in +Inf.
  assert.match(after, /^llmproxy_request_duration_seconds_bucket\{le="1200"\} /m);
  assert.match(after, /^llmproxy_latency_ms_bucket\{le="1200000"\} /m);
  // 5 tokens + finish chunk + [DONE]: up to 6 gaps per stream (the last two are written together).
  assert.ok(delta('llmproxy_stream_event_gap_seconds_count', {}) >= 4 * 3);
  assert.equal(sample(after, 'llmproxy_backend_up', { backend: 'a' }), 1);
  assert.equal(sample(after, 'llmproxy_backend_in_flight_requests', { backend: 'a' }), 0);
  for (const type of ['prompt', 'completion']) {
    assert.ok(after.includes(`llmproxy_usage_tokens_total{type="${type}"}`), `usage tokens ${type} exported`);
  }
  assert.ok(after.includes('llmproxy_webhook_success_total'));
  assert.ok(after.includes('llmproxy_webhook_failure_total'));
  assert.ok(!/req_[0-9a-f]{24}/.test(after), 'no request ids as label values');
});

test('every query of grafana/dashboard.json names a metric the gateway exports', async () => {
  const fs = await import('node:fs');
  const path = await import('node:path');
  const file = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../grafana/dashboard.json');
  const dashboard = JSON.parse(fs.readFileSync(file, 'utf8'));
  const exported = new Set(
    (await scrape())
      .split('\n')
      .filter((l) => l.startsWith('# TYPE '))
      .map((l) => l.split(' ')[2]),
  );
  const exprs = dashboard.panels.flatMap((p) => (p.targets ?? []).map((t) => t.expr));
  assert.ok(exprs.length >= 10, `only ${exprs.length} queries`);
  for (const expr of exprs) {
    const names = expr.match(/llmproxy_[a-z_]+/g) ?? [];
    assert.ok(names.length > 0, `query names no llmproxy metric: ${expr}`);
    for (const name of names) {
      const base = name.replace(/_(bucket|sum|count)$/, '');
      assert.ok(exported.has(base), `dashboard query uses ${name}, which /metrics does not export: ${expr}`);
    }
  }
  for (const p of dashboard.panels) assert.equal(p.datasource?.uid, 'prometheus', `panel ${p.title}`);
});
