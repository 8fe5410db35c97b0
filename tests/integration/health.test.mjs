// Health checking: dead backends leave the rotation, come back when they recover, an all-down
// pool answers 503, and a refused connection is retried on another backend.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startBackend,
  startGateway,
  startMock,
  mockPathCount,
  backendEntry,
  httpRequest,
  postJson,
  chatBody,
  keepAliveAgent,
  waitUntil,
  openAIError,
  freePort,
  chatStreamContent,
  mockTokens,
  tally,
  gatewayConfig,
  toYaml,
  writeTempFile,
  spawnListening,
  gatewaySanitized,
  LLMPROXY_BIN,
  SUITE_DIR,
} from './lib/harness.mjs';
import { scrapeMetrics, metricSample } from './lib/usage.mjs';
import fs from 'node:fs';
import path from 'node:path';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

const CHAT = '/v1/chat/completions';
const HEALTH = {
  enabled: true,
  interval: '200ms',
  path: '/health',
  timeout: '500ms',
  unhealthy_threshold: 2,
  healthy_threshold: 1,
};

// Health checks of a backend have completed at least once when it has seen the second one.
async function waitChecked(target, n = 2) {
  const count = target.healthChecks !== undefined ? async () => target.healthChecks : async () => mockPathCount(target, '/health');
  await waitUntil(async () => (await count()) >= n, { timeout: 10_000, what: `${n} health checks on ${target.name}` });
}

// Sends `n` requests; true when every one got a 200 from `name`.
async function allFrom(gw, name, n, agent) {
  for (let i = 0; i < n; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
    if (res.status !== 200 || res.headers['x-mock-backend'] !== name) return false;
  }
  return true;
}


test('a killed backend leaves the rotation: all traffic goes to the survivor, no 5xx', { timeout: 60_000 }, async () => {
  const a = await startMock({ name: 'a' });
  const b = await startMock({ name: 'b' });
  const gw = await startGateway({
    health_check: HEALTH,
    // No retries: only the health checker can keep requests away from the dead backend.
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })],
  });
  await waitChecked(a);
  await waitChecked(b);
  const agent = keepAliveAgent();
  const t0 = await tally(gw, 10, agent);
  assert.ok(t0.a >= 3 && t0.b >= 3 && t0.a + t0.b === 10, `before the kill: ${JSON.stringify(t0)}`);

  await a.kill();
  await waitUntil(() => allFrom(gw, 'b', 20, agent), { timeout: 15_000, what: 'all traffic to go to b' });
  assert.deepEqual(await tally(gw, 100, agent), { b: 100 });
  const ready = await httpRequest(`${gw.url}/ready`);
  assert.equal(ready.status, 200);
});

test('a backend that stops and listens again on its port leaves and rejoins the rotation', { timeout: 60_000 }, async () => {
  const a = await startBackend('a');
  const b = await startMock({ name: 'b' });
  const gw = await startGateway({
    health_check: HEALTH,
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })],
  });
  await waitChecked(a);
  await waitChecked(b);
  const agent = keepAliveAgent();
  const t0 = await tally(gw, 10, agent);
  assert.ok(t0.a >= 3 && t0.b >= 3 && t0.a + t0.b === 10, `before the stop: ${JSON.stringify(t0)}`);

  const port = a.port;
  await a.stop();
  await waitUntil(() => allFrom(gw, 'b', 20, agent), { timeout: 15_000, what: 'all traffic to go to b' });
  assert.deepEqual(await tally(gw, 50, agent), { b: 50 });

  await a.listen(port);
  assert.equal(a.port, port);
  const before = a.apiRequests.length;
  await waitUntil(
    async () => {
      await postJson(gw.url, CHAT, chatBody('m1'), { agent });
      return a.apiRequests.length > before;
    },
    { timeout: 15_000, what: 'a to receive traffic again' },
  );
  const t = await tally(gw, 20, agent);
  assert.equal((t.a ?? 0) + (t.b ?? 0), 20, `errors after recovery: ${JSON.stringify(t)}`);
  assert.ok(t.a >= 8 && t.b >= 8, `traffic not shared again: ${JSON.stringify(t)}`);
});

test('a backend whose /health fails gets no traffic until it passes again', { timeout: 60_000 }, async () => {
  const a = await startBackend('a');
  const b = await startMock({ name: 'b' });
  const gw = await startGateway({
    health_check: HEALTH,
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })],
  });
  a.healthStatus = 503;
  // Two failed checks mark it down; the third one started after the second was handled.
  const failedFrom = a.healthChecks;
  await waitUntil(() => a.healthChecks >= failedFrom + 3, { timeout: 10_000, what: 'three failed health checks' });
  const agent = keepAliveAgent();
  const before = a.apiRequests.length;
  assert.deepEqual(await tally(gw, 30, agent), { b: 30 });
  assert.equal(a.apiRequests.length, before, 'an unhealthy backend received requests');

  a.healthStatus = 200;
  await waitUntil(
    async () => {
      await postJson(gw.url, CHAT, chatBody('m1'), { agent });
      return a.apiRequests.length > before;
    },
    { timeout: 15_000, what: 'a to receive traffic after passing health checks again' },
  );
});

test('all backends down: requests get 503, /ready 503, /health still 200', { timeout: 60_000 }, async () => {
  const a = await startMock({ name: 'a', models: ['m1'] });
  const gw = await startGateway({ health_check: HEALTH, backends: [backendEntry(a, { name: 'a', models: ['m1'] })] });
  await waitUntil(async () => (await httpRequest(`${gw.url}/ready`)).status === 200, { timeout: 10_000, what: '/ready 200' });
  const ok = await postJson(gw.url, CHAT, chatBody('m1'));
  assert.equal(ok.status, 200);

  await a.kill();
  await waitUntil(async () => (await httpRequest(`${gw.url}/ready`)).status === 503, { timeout: 15_000, what: '/ready 503' });
  for (const stream of [false, true]) {
    const res = await postJson(gw.url, CHAT, chatBody('m1', { stream }));
    assert.equal(res.status, 503, res.text());
    openAIError(res);
  }
  const health = await httpRequest(`${gw.url}/health`);
  assert.equal(health.status, 200);
  assert.match(String(health.headers['content-type']), /application\/json/);
  health.json();
  const models = await httpRequest(`${gw.url}/v1/models`);
  assert.equal(models.status, 200);
  assert.deepEqual(models.json().data, [], 'models of an unhealthy backend are still listed');
});

test('connection refused is retried on another backend: every request succeeds', { timeout: 60_000 }, async () => {
  const deadPort = await freePort();
  const live = await startMock({ name: 'live' });
  const gw = await startGateway({
    load_balancing: { strategy: 'weighted_round_robin', max_retries: 1 },
    backends: [backendEntry(`http://127.0.0.1:${deadPort}`, { name: 'dead' }), backendEntry(live, { name: 'live' })],
  });
  const agent = keepAliveAgent();
  for (let i = 0; i < 20; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
    assert.equal(res.status, 200, `request ${i}: ${res.status} ${res.text()}`);
    assert.equal(res.headers['x-mock-backend'], 'live');
  }
  for (let i = 0; i < 4; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m1', { stream: true }), { agent, headers: { 'x-mock-tokens': '5' } });
    assert.equal(res.status, 200, `stream ${i}: ${res.status} ${res.text()}`);
    const { content, done } = chatStreamContent(res.text());
    assert.equal(content, mockTokens(5));
    assert.ok(done);
  }
  assert.equal(await mockPathCount(live, CHAT), 24);
});

test('without retries a refused connection is an OpenAI-shaped 502/503 (the retry above is real)', { timeout: 60_000 }, async () => {
  const deadPort = await freePort();
  const live = await startMock({ name: 'live' });
  const gw = await startGateway({
    load_balancing: { strategy: 'weighted_round_robin', max_retries: 0 },
    backends: [backendEntry(`http://127.0.0.1:${deadPort}`, { name: 'dead' }), backendEntry(live, { name: 'live' })],
  });
  const statuses = [];
  for (let i = 0; i < 4; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m1'));
    statuses.push(res.status);
    if (res.status !== 200) {
      assert.ok(res.status === 502 || res.status === 503, `status ${res.status}`);
      openAIError(res);
    }
  }
  assert.ok(statuses.some((s) => s !== 200), `every request succeeded without retries: ${statuses}`);
  assert.ok(statuses.some((s) => s === 200), `no request reached the live backend: ${statuses}`);
});

test('the access log names how each request ended: completed, or upstream_error when no backend answered', { timeout: 60_000 }, async () => {
  const deadPort = await freePort();
  const live = await startMock({ name: 'live' });
  const gw = await startGateway({
    server: { workers: 1, access_log: true },
    load_balancing: { max_retries: 1 },
    backends: [
      backendEntry(`http://127.0.0.1:${deadPort}`, { name: 'dead', models: ['lost'] }),
      backendEntry(live, { name: 'live', models: ['m1'] }),
    ],
  });
  const ok = await postJson(gw.url, CHAT, chatBody('m1'), { headers: { 'x-request-id': 'log-ok' } });
  assert.equal(ok.status, 200);
  const lost = await postJson(gw.url, CHAT, chatBody('lost'), { headers: { 'x-request-id': 'log-lost' } });
  assert.ok(lost.status === 502 || lost.status === 503, `status ${lost.status}`);
  const line = async (id) => {
    let found;
    await waitUntil(() => (found = gw.stdout.split('\n').find((l) => l.includes(`"request_id":"${id}"`))), {
      timeout: 10_000,
      what: `the access log line of ${id}`,
    });
    return JSON.parse(found);
  };
  const a = await line('log-ok');
  assert.equal(a.status, 200);
  assert.equal(a.finish, 'completed');
  assert.equal(a.backend, 'live');
  const b = await line('log-lost');
  assert.equal(b.status, lost.status);
  assert.equal(b.finish, 'upstream_error', JSON.stringify(b));
});

test('a 502 after every backend failed names each one and why', { timeout: 60_000 }, async () => {
  const [portA, portB] = [await freePort(), await freePort()];
  const gw = await startGateway({
    load_balancing: { max_retries: 2 },
    health_check: { enabled: false },
    backends: [
      backendEntry(`http://127.0.0.1:${portA}`, { name: 'first' }),
      backendEntry(`http://127.0.0.1:${portB}`, { name: 'second' }),
    ],
  });
  const res = await postJson(gw.url, CHAT, chatBody('m1'));
  assert.equal(res.status, 502, res.text());
  const { message } = openAIError(res);
  assert.match(message, /^No backend answered: /, message);
  for (const name of ['first', 'second']) {
    assert.match(message, new RegExp(`\\b${name}: connect: Connection refused`), message);
  }
  // One backend tried (max_retries 0): its error alone.
  const single = await startGateway({
    load_balancing: { max_retries: 0 },
    health_check: { enabled: false },
    backends: [backendEntry(`http://127.0.0.1:${portA}`, { name: 'only' })],
  });
  const one = await postJson(single.url, CHAT, chatBody('m1'));
  assert.equal(one.status, 502, one.text());
  assert.equal(openAIError(one).message, 'The backend did not answer: only: connect: Connection refused');
  // A backend that takes the request and closes the connection was reached: the message says so.
  const closing = await startBackend('closes');
  closing.handler = async (req, res, body, record) => record.socket.destroy();
  const gw3 = await startGateway({
    load_balancing: { max_retries: 0 },
    health_check: { enabled: false },
    backends: [backendEntry(closing, { name: 'closes' })],
  });
  const closed = await postJson(gw3.url, CHAT, chatBody('m1'));
  assert.equal(closed.status, 502, closed.text());
  assert.equal(openAIError(closed).message, 'The backend did not answer: closes: closed the connection without answering');
});

test('answers 5xx mark a backend down only with passive_5xx; by default it keeps serving', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'a' });
  // Active checks rarely (the first one at start): only passive results can move the verdict.
  const checks = { ...HEALTH, interval: '60s', unhealthy_threshold: 3, healthy_threshold: 2 };
  for (const passive5xx of [false, true]) {
    const gw = await startGateway({
      health_check: { ...checks, passive_5xx: passive5xx },
      load_balancing: { max_retries: 0 },
      backends: [backendEntry(mock, { name: 'a' })],
    });
    // The check at start is done (its success would reset the count of failures below).
    await waitUntil(async () => (await httpRequest(`${gw.url}/admin/backends`)).json().backends[0].last_check, {
      timeout: 10_000,
      what: 'the first health check',
    });
    // One client's request answered 503, as the SDKs send it: once and twice more (retries).
    for (let i = 0; i < 3; i++) {
      const res = await postJson(gw.url, CHAT, chatBody('m1'), { headers: { 'x-mock-status': '503' } });
      assert.equal(res.status, 503, res.text());
    }
    const next = await postJson(gw.url, CHAT, chatBody('m1'));
    const [a] = (await httpRequest(`${gw.url}/admin/backends`)).json().backends;
    if (passive5xx) {
      assert.equal(next.status, 503, next.text());
      assert.equal(openAIError(next).code, 'no_healthy_backend');
      assert.equal(next.headers['retry-after'], '120', 'retry after healthy_threshold passed checks');
      assert.equal(a.healthy, false, JSON.stringify(a));
    } else {
      assert.equal(next.status, 200, next.text());
      assert.equal(a.healthy, true, JSON.stringify(a));
      assert.equal(a.consecutive_failures, 0, JSON.stringify(a));
    }
  }
});

test('/ready waits for a health check to pass: a backend that never answers one is not ready at start', { timeout: 60_000 }, async () => {
  // A backend that accepts connections and never answers: its first check is still pending.
  const silent = net.createServer((socket) => socket.on('error', () => {}));
  const sockets = new Set();
  silent.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise((resolve) => silent.listen(0, '127.0.0.1', resolve));
  try {
    const gw = await startGateway({
      health_check: { ...HEALTH, timeout: '5s', unhealthy_threshold: 3 },
      backends: [{ url: `http://127.0.0.1:${silent.address().port}`, name: 'silent' }],
    });
    const ready = await httpRequest(`${gw.url}/ready`);
    assert.equal(ready.status, 503, ready.text());
    assert.equal(openAIError(ready).message, 'No backend has passed a health check yet.');
    // A backend that passes its check makes the gateway ready.
    const ok = await startBackend('passes');
    const gw2 = await startGateway({ health_check: HEALTH, backends: [backendEntry(ok, { name: 'passes' })] });
    await waitUntil(async () => (await httpRequest(`${gw2.url}/ready`)).status === 200, { timeout: 10_000, what: '/ready 200' });
    assert.ok(ok.healthChecks >= 1);
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => silent.close(resolve));
  }
});

// The LD_PRELOAD shim built with the tests (tests/support/hang_getaddrinfo.cpp): names ending in
// .hang.invalid never resolve, as behind a name server that stopped answering.
const HANG_SHIM = process.env.HANG_SHIM ?? path.resolve(SUITE_DIR, '../../build/libhang_getaddrinfo.so');

test('a backend name whose lookup never returns holds no other backend\'s health checks and no request past timeouts.connect', {
  timeout: 60_000,
  skip: (gatewaySanitized() && 'AddressSanitizer must come first among preloaded libraries') || (!fs.existsSync(HANG_SHIM) && `no ${HANG_SHIM}`),
}, async () => {
  const a = await startMock({ name: 'a', models: ['m-a'] });
  const backends = [
    // "localhost": a name, looked up as the other one is.
    { url: `http://localhost:${a.port}`, name: 'a', models: ['m-a'] },
    { url: 'http://backend.hang.invalid:1', name: 'x', models: ['m-x'] },
  ];
  const start = (overrides) => {
    const file = writeTempFile('llmproxy.yaml', toYaml(gatewayConfig({ server: { workers: 1 }, timeouts: { connect: '500ms' }, backends, ...overrides })));
    return spawnListening('llmproxy', LLMPROXY_BIN, ['--config', file], { cwd: path.dirname(file), env: { LD_PRELOAD: HANG_SHIM } });
  };
  const gw = await start({ health_check: { ...HEALTH, timeout: '300ms' } });
  const up = async (name) => metricSample(await scrapeMetrics(gw), 'llmproxy_backend_up', { backend: name });
  await waitUntil(async () => (await up('x')) === 0, { timeout: 20_000, what: 'x marked down' });
  // With x's lookup hung, a's checks still reach it, and a stays up.
  const checks = await mockPathCount(a, '/health');
  await waitUntil(async () => (await mockPathCount(a, '/health')) >= checks + 3, { timeout: 20_000, what: "a's health checks to go on" });
  assert.equal(await up('a'), 1, 'a healthy backend was marked down');
  const ok = await postJson(gw.url, CHAT, chatBody('m-a'));
  assert.equal(ok.status, 200, ok.text());

  // Without health checks a request for x's model is sent to x: it waits for the name no longer
  // than timeouts.connect per attempt, and a's requests meanwhile are not held.
  const gw2 = await start({ health_check: { enabled: false } });
  const started = Date.now();
  const pending = postJson(gw2.url, CHAT, chatBody('m-x'), { timeout: 30_000 });
  const other = await postJson(gw2.url, CHAT, chatBody('m-a'));
  assert.equal(other.status, 200, other.text());
  const res = await pending;
  const took = Date.now() - started;
  assert.ok(res.status === 502 || res.status === 504, `${res.status} ${res.text()}`);
  openAIError(res);
  assert.ok(took < 20_000, `answered after ${took} ms`);
});
