// Requests the gateway answers itself: each gets the right status and an OpenAI-shaped JSON error,
// and never reaches a backend.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startBackend,
  startGateway,
  startMock,
  mockStats,
  backendEntry,
  httpRequest,
  postJson,
  chatBody,
  rawExchange,
  rawRequest,
  openAIError,
  waitUntil,
} from './lib/harness.mjs';
import { scrapeMetrics, metricSum } from './lib/usage.mjs';

let mock;
let gw;
const API_PATHS = ['/v1/chat/completions', '/v1/completions', '/v1/embeddings'];

before(async () => {
  mock = await startMock({ name: 'm', models: ['m1'] });
  gw = await startGateway({
    server: { max_body_size: '1MiB' },
    backends: [backendEntry(mock, { name: 'm', models: ['m1'] })],
  });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// Runs `fn` and asserts that the backend saw no request on any API path meanwhile.
async function backendUntouched(fn) {
  const count = (stats, p) => Number(stats.by_path?.[p] ?? 0);
  const before = await mockStats(mock);
  await fn();
  const after = await mockStats(mock);
  for (const p of API_PATHS) assert.equal(count(after, p), count(before, p), `the backend saw a request on ${p}`);
}

function assertError(res, status, codes) {
  assert.equal(res.status, status, `status ${res.status}: ${res.body.toString().slice(0, 300)}`);
  const e = openAIError(res);
  if (codes) assert.ok(codes.includes(e.code), `error.code ${JSON.stringify(e.code)}, want one of ${codes}`);
  return e;
}

test('400 on a body that is not JSON', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    for (const body of ['{"model": "m1", "messages": [', 'not json', '{"model":"m1"} trailing', '']) {
      const res = await postJson(gw.url, '/v1/chat/completions', body);
      assertError(res, 400, ['invalid_json', 'invalid_request']);
    }
  });
});

test('400 on a JSON body that is not an object', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    for (const body of ['[1]', '"text"', '42', 'null']) {
      const res = await postJson(gw.url, '/v1/chat/completions', body);
      assertError(res, 400, ['invalid_json', 'invalid_request']);
    }
  });
});

test('400 when "stream" is not a boolean', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    for (const p of ['/v1/chat/completions', '/v1/completions']) {
      for (const stream of ['yes', 'true', 1, 0, {}, []]) {
        const res = await postJson(gw.url, p, { model: 'm1', messages: [], prompt: 'x', stream });
        const e = assertError(res, 400, ['invalid_json', 'invalid_request']);
        assert.equal(e.param, 'stream', 'error.param names the field at fault');
      }
    }
  });
});

test('400 string_above_max_length when "model" or "user" is over 1,024 bytes; at 1,024 it passes', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    for (const field of ['model', 'user']) {
      const res = await postJson(gw.url, '/v1/chat/completions', { ...chatBody('m1'), [field]: 'x'.repeat(1025) });
      const e = assertError(res, 400, ['string_above_max_length']);
      assert.equal(e.type, 'invalid_request_error');
      assert.equal(e.param, field);
      assert.match(e.message, /maximum length 1024 bytes, but got 1025/);
    }
  });
  const ok = await postJson(gw.url, '/v1/chat/completions', { ...chatBody('m1'), user: 'u'.repeat(1024) });
  assert.equal(ok.status, 200, ok.text().slice(0, 300));
});

// Raw client: the gateway may answer before reading the whole body, and close.
function headersFirst(res) {
  res.headers = Object.fromEntries(Object.entries(res.headers).map(([k, v]) => [k, v[0]]));
  return res;
}

test('413 on a Content-Length over max_body_size, answered before the body is sent', { timeout: 30_000 }, async () => {
  await backendUntouched(async () => {
    // Only the head: the gateway can refuse from the Content-Length alone.
    const bytes = rawRequest('POST', '/v1/chat/completions', [
      ['Host', `127.0.0.1:${gw.port}`],
      ['Content-Type', 'application/json'],
      ['Content-Length', String(1536 * 1024)],
    ]);
    const count = async () => metricSum(await scrapeMetrics(gw), 'llmproxy_requests_total', { path: '/v1/chat/completions', status: 413 });
    const before = await count();
    assertError(headersFirst(await rawExchange(gw.port, bytes)), 413);
    // Counted under its route, as a chunked body refused at the limit is, not under `other`;
    // a target in absolute form too.
    await waitUntil(async () => (await count()) === before + 1, { timeout: 5_000, what: 'the 413 counted under its path' });
    const absolute = rawRequest('POST', `http://127.0.0.1:${gw.port}/v1/chat/completions`, [
      ['Host', `127.0.0.1:${gw.port}`],
      ['Content-Type', 'application/json'],
      ['Content-Length', String(1536 * 1024)],
    ]);
    assertError(headersFirst(await rawExchange(gw.port, absolute)), 413);
    await waitUntil(async () => (await count()) === before + 2, { timeout: 5_000, what: 'the absolute-form 413 counted under its path' });
  });
});

test('413 on a body over max_body_size sent whole, as clients do', { timeout: 30_000 }, async () => {
  await backendUntouched(async () => {
    const body = Buffer.from(JSON.stringify(chatBody('m1', { pad: 'x'.repeat(1536 * 1024) })));
    const bytes = rawRequest('POST', '/v1/chat/completions', [
      ['Host', `127.0.0.1:${gw.port}`],
      ['Content-Type', 'application/json'],
      ['Content-Length', String(body.length)],
    ], body);
    // The client writes the whole body before it reads: the response must survive that.
    assertError(headersFirst(await rawExchange(gw.port, bytes)), 413);
    const viaHttp = await postJson(gw.url, '/v1/chat/completions', body);
    assertError(viaHttp, 413);
  });
});

test('413 reaches clients that upload a body many times the limit before reading', { timeout: 60_000 }, async () => {
  // The gateway answers at the limit and half-closes, then reads and discards the rest of the
  // upload: closing with unread bytes would make the kernel send a reset, and the client's
  // stack would drop the answer (Node: EPIPE or ECONNRESET instead of the 413).
  await backendUntouched(async () => {
    const body = Buffer.from(JSON.stringify(chatBody('m1', { pad: 'x'.repeat(24 * 1024 * 1024) })));
    const results = [];
    for (let i = 0; i < 6; i++) {
      try {
        const res = await postJson(gw.url, '/v1/chat/completions', body);
        results.push(res.status);
        if (res.status === 413) assertError(res, 413);
      } catch (err) {
        results.push(err.code ?? err.message);
      }
    }
    assert.deepEqual(results, [413, 413, 413, 413, 413, 413]);
  });
});

test('413 on a chunked body over max_body_size', { timeout: 30_000 }, async () => {
  await backendUntouched(async () => {
    const piece = Buffer.from('x'.repeat(64 * 1024));
    const chunks = [Buffer.from('{"model":"m1","pad":"')];
    for (let i = 0; i < 24; i++) chunks.push(piece);
    chunks.push(Buffer.from('"}'));
    const framed = [];
    for (const c of chunks) framed.push(Buffer.from(c.length.toString(16) + '\r\n'), c, Buffer.from('\r\n'));
    framed.push(Buffer.from('0\r\n\r\n'));
    const bytes = rawRequest('POST', '/v1/chat/completions', [
      ['Host', `127.0.0.1:${gw.port}`],
      ['Content-Type', 'application/json'],
      ['Transfer-Encoding', 'chunked'],
    ], Buffer.concat(framed));
    assertError(headersFirst(await rawExchange(gw.port, bytes)), 413);
  });
});

test('a body just under max_body_size is accepted', { timeout: 30_000 }, async () => {
  // Sanity check that 413 is about the limit: ~1000 KiB passes. (This one reaches the backend.)
  const res = await postJson(gw.url, '/v1/embeddings', { model: 'm1', input: 'x'.repeat(1000 * 1024) });
  assert.equal(res.status, 200, res.text().slice(0, 300));
});

test("the gateway's own answers carry a Date in IMF-fixdate form", { timeout: 20_000 }, async () => {
  for (const res of [await httpRequest(`${gw.url}/v2/nothing`), await httpRequest(`${gw.url}/health`)]) {
    const date = res.headers.date;
    assert.match(date ?? '', /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$/);
    // The same clock as the test's: within a day, whatever the machine's load.
    assert.ok(Math.abs(Date.parse(date) - Date.now()) < 86_400_000, date);
  }
});

test('404 on an unknown path', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    assertError(await httpRequest(`${gw.url}/v2/nothing`), 404);
    assertError(await postJson(gw.url, '/v1/not-an-endpoint', chatBody('m1')), 404);
    const stats = await mockStats(mock);
    assert.equal(Number(stats.by_path?.['/v1/not-an-endpoint'] ?? 0), 0);
    assert.equal(Number(stats.by_path?.['/v2/nothing'] ?? 0), 0);
  });
});

test('405 on a wrong method for a known path', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    assertError(await httpRequest(`${gw.url}/v1/chat/completions`), 405);
    const put = await httpRequest(`${gw.url}/v1/embeddings`, { method: 'PUT', body: '{}', headers: { 'content-type': 'application/json' } });
    assertError(put, 405);
    assertError(await postJson(gw.url, '/v1/models', {}), 405);
  });
});

test('404 model_not_found for a model no backend serves', { timeout: 20_000 }, async () => {
  await backendUntouched(async () => {
    for (const stream of [false, true]) {
      const res = await postJson(gw.url, '/v1/chat/completions', chatBody('gpt-nonexistent', { stream }));
      assertError(res, 404, ['model_not_found']);
    }
    const emb = await postJson(gw.url, '/v1/embeddings', { model: 'gpt-nonexistent', input: 'x' });
    assertError(emb, 404, ['model_not_found']);
  });
});

test('503 when no backend is healthy; the backend sees no API request', { timeout: 30_000 }, async () => {
  const sick = await startBackend('sick');
  sick.healthStatus = 500;
  const gw2 = await startGateway({
    health_check: { enabled: true, interval: '200ms', timeout: '500ms', unhealthy_threshold: 2, healthy_threshold: 1 },
    backends: [backendEntry(sick, { name: 'sick' })],
  });
  // Marked down by its checks (/ready says 503 from the start: no check ever passed).
  await waitUntil(async () => JSON.parse((await httpRequest(`${gw2.url}/health`)).text()).backends.healthy === 0, {
    timeout: 10_000,
    what: 'the backend marked down',
  });
  const before = sick.apiRequests.length;
  for (const stream of [false, true]) {
    const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1', { stream }));
    assertError(res, 503);
  }
  assert.equal(sick.apiRequests.length, before, 'an unhealthy backend received a request');
  // Still alive after answering 503s.
  const health = await httpRequest(`${gw2.url}/health`);
  assert.equal(health.status, 200);
});
