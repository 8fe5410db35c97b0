// Load balancing: weighted round robin shares, least-in-flight steering around busy backends,
// and model-aware routing.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startGateway,
  startMock,
  mockPathCount,
  backendEntry,
  httpRequest,
  postJson,
  chatBody,
  keepAliveAgent,
  openRawStream,
  jsonPostBytes,
  waitUntil,
  openAIError,
} from './lib/harness.mjs';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

const CHAT = '/v1/chat/completions';

test('weighted round robin: weights 5 and 3 give 5/8 and 3/8 of 800 requests', { timeout: 120_000 }, async () => {
  const a = await startMock({ name: 'a' });
  const b = await startMock({ name: 'b' });
  const gw = await startGateway({
    backends: [backendEntry(a, { name: 'a', weight: 5 }), backendEntry(b, { name: 'b', weight: 3 })],
  });
  const agent = keepAliveAgent();
  const counts = { a: 0, b: 0 };
  for (let i = 0; i < 800; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
    assert.equal(res.status, 200, res.text());
    const who = res.headers['x-mock-backend'];
    assert.ok(who === 'a' || who === 'b', `unexpected X-Mock-Backend ${who}`);
    counts[who]++;
  }
  assert.ok(Math.abs(counts.a / 800 - 5 / 8) <= 0.05, `a got ${counts.a} of 800, want ~500`);
  assert.ok(Math.abs(counts.b / 800 - 3 / 8) <= 0.05, `b got ${counts.b} of 800, want ~300`);
  // The mocks' own counters agree with the response headers.
  assert.equal(await mockPathCount(a, CHAT), counts.a);
  assert.equal(await mockPathCount(b, CHAT), counts.b);
});

test('least_in_flight: while one backend holds long streams, new requests go to the other', { timeout: 60_000 }, async () => {
  // "hold" is only served by a, so the held streams land there; "any" is served by both.
  const a = await startMock({ name: 'a', models: ['hold', 'any'] });
  const b = await startMock({ name: 'b', models: ['any'] });
  const gw = await startGateway({
    load_balancing: { strategy: 'least_in_flight', max_retries: 1 },
    backends: [
      backendEntry(a, { name: 'a', weight: 1, models: ['hold', 'any'] }),
      backendEntry(b, { name: 'b', weight: 1, models: ['any'] }),
    ],
  });
  const held = [];
  try {
    for (let i = 0; i < 3; i++) {
      held.push(
        await openRawStream(
          gw.port,
          jsonPostBytes(gw.port, CHAT, chatBody('hold', { stream: true }), [['X-Mock-TTFT-Ms', '30000']]),
        ),
      );
    }
    await waitUntil(async () => (await mockPathCount(a, CHAT)) >= 3, { timeout: 10_000, what: 'backend a to hold 3 streams' });
    const agent = keepAliveAgent();
    const seen = { a: 0, b: 0 };
    for (let i = 0; i < 20; i++) {
      const res = await postJson(gw.url, CHAT, chatBody('any'), { agent });
      assert.equal(res.status, 200, res.text());
      seen[res.headers['x-mock-backend']]++;
    }
    assert.deepEqual(seen, { a: 0, b: 20 }, 'requests went to the busy backend');
    assert.equal(await mockPathCount(a, CHAT), 3);
  } finally {
    for (const s of held) s.destroy();
  }
});

test('least_in_flight spreads concurrent streams over both backends', { timeout: 60_000 }, async () => {
  const a = await startMock({ name: 'a' });
  const b = await startMock({ name: 'b' });
  const gw = await startGateway({
    load_balancing: { strategy: 'least_in_flight', max_retries: 1 },
    backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })],
  });
  const held = [];
  try {
    // Each stream is opened only after the previous one reached its backend, so the gateway
    // knows about every earlier one when it picks.
    for (let i = 0; i < 4; i++) {
      held.push(
        await openRawStream(gw.port, jsonPostBytes(gw.port, CHAT, chatBody('m1', { stream: true }), [['X-Mock-TTFT-Ms', '30000']])),
      );
      await waitUntil(async () => (await mockPathCount(a, CHAT)) + (await mockPathCount(b, CHAT)) >= i + 1, {
        timeout: 10_000,
        what: `stream ${i} to reach a backend`,
      });
    }
    assert.equal(await mockPathCount(a, CHAT), 2);
    assert.equal(await mockPathCount(b, CHAT), 2);
  } finally {
    for (const s of held) s.destroy();
  }
});

test('model routing: each model only reaches the backends that serve it', { timeout: 60_000 }, async () => {
  const a = await startMock({ name: 'a', models: ['m1'] });
  const b = await startMock({ name: 'b', models: ['m2'] });
  const gw = await startGateway({
    backends: [backendEntry(a, { name: 'a', models: ['m1'] }), backendEntry(b, { name: 'b', models: ['m2'] })],
  });
  const agent = keepAliveAgent();
  for (let i = 0; i < 20; i++) {
    const r1 = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
    assert.equal(r1.status, 200, r1.text());
    assert.equal(r1.headers['x-mock-backend'], 'a');
    const r2 = await postJson(gw.url, CHAT, chatBody('m2', { stream: i % 2 === 0 }), { agent });
    assert.equal(r2.status, 200, r2.text());
    assert.equal(r2.headers['x-mock-backend'], 'b');
  }
  const emb = await postJson(gw.url, '/v1/embeddings', { model: 'm2', input: 'hello' }, { agent });
  assert.equal(emb.status, 200, emb.text());
  assert.equal(emb.headers['x-mock-backend'], 'b');
  assert.equal(await mockPathCount(a, CHAT), 20);
  assert.equal(await mockPathCount(b, CHAT), 20);

  const unknown = await postJson(gw.url, CHAT, chatBody('no-such-model'), { agent });
  assert.equal(unknown.status, 404, unknown.text());
  assert.equal(openAIError(unknown).code, 'model_not_found');
  assert.equal(await mockPathCount(a, CHAT), 20, 'an unknown model reached a backend');
  assert.equal(await mockPathCount(b, CHAT), 20, 'an unknown model reached a backend');

  const models = await httpRequest(`${gw.url}/v1/models`);
  assert.equal(models.status, 200);
  const list = models.json();
  assert.equal(list.object, 'list');
  assert.deepEqual(list.data.map((m) => m.id).sort(), ['m1', 'm2']);
  for (const m of list.data) assert.equal(m.object, 'model');
});

test('GET /v1/models lists a model served by several backends once', { timeout: 30_000 }, async () => {
  const a = await startMock({ name: 'a', models: ['m1', 'm2'] });
  const b = await startMock({ name: 'b', models: ['m2', 'm3'] });
  const gw = await startGateway({
    backends: [backendEntry(a, { name: 'a', models: ['m1', 'm2'] }), backendEntry(b, { name: 'b', models: ['m2', 'm3'] })],
  });
  const res = await httpRequest(`${gw.url}/v1/models`);
  assert.equal(res.status, 200);
  assert.match(String(res.headers['content-type']), /application\/json/);
  assert.deepEqual(res.json().data.map((m) => m.id).sort(), ['m1', 'm2', 'm3']);
  // m2 is served by both: requests for it are spread over both.
  const agent = keepAliveAgent();
  const seen = new Set();
  for (let i = 0; i < 10; i++) {
    const r = await postJson(gw.url, CHAT, chatBody('m2'), { agent });
    assert.equal(r.status, 200);
    seen.add(r.headers['x-mock-backend']);
  }
  assert.deepEqual([...seen].sort(), ['a', 'b']);
});

test('GET /v1/models lists what backends report even with health checks off', { timeout: 30_000 }, async () => {
  const a = await startMock({ name: 'a', models: ['m1', 'm2'] });
  const b = await startMock({ name: 'b', models: ['m3'] });
  const gw = await startGateway({
    health_check: { enabled: false },
    // a reports its models itself; b's come from the config.
    backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b', models: ['m3'] })],
  });
  let ids = [];
  await waitUntil(
    async () => {
      ids = (await httpRequest(`${gw.url}/v1/models`)).json().data.map((m) => m.id).sort();
      return ids.length === 3;
    },
    { timeout: 10_000, what: "a's models to be discovered" },
  );
  assert.deepEqual(ids, ['m1', 'm2', 'm3']);
  assert.equal(await mockPathCount(a, '/health'), 0, 'health checks are off, yet a was checked');
  assert.ok((await mockPathCount(a, '/v1/models')) >= 1);
  assert.equal(await mockPathCount(b, '/v1/models'), 0, "b's models are configured, yet it was asked");
});
