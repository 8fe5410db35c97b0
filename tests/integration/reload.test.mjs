// Hot reload of the --config file, by POST /admin/reload and by SIGHUP: new backends take the new
// requests at once, a stream in flight ends whole on the backend it started on (also a removed
// one), keep-alive client connections stay open, an invalid file changes nothing (400
// invalid_config, logged with the file's path), restart-only keys are reported and keep their
// running value, weights, usage sinks and admin.token are reloaded, health verdicts and
// per-backend metrics carry over, and the reload counters and generation gauge count it all.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { spawn } from 'node:child_process';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startGateway,
  startMock,
  startBackend,
  startWebhook,
  backendEntry,
  toYaml,
  freePort,
  connect,
  httpRequest,
  postJson,
  chatBody,
  keepAliveAgent,
  openRawStream,
  jsonPostBytes,
  parseResponse,
  chatStreamContent,
  openAIError,
  deferred,
  waitUntil,
  withTimeout,
  mockTokens,
  tally,
  gatewaySanitized,
} from './lib/harness.mjs';
import { scrapeMetrics, sinkConfig, hookConfig, mapLimit, metricSample as sample } from './lib/usage.mjs';

const CHAT = '/v1/chat/completions';

let a;
let b;

before(async () => {
  a = await startMock({ name: 'a' });
  b = await startMock({ name: 'b' });
});
beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// ---- helpers ----

// Rewrites the gateway's own config file: `mutate` edits a copy of the config it runs with (so the
// usage log path and every other key stay as they were). The copy becomes gw.config.
function rewriteConfig(gw, mutate) {
  const cfg = structuredClone(gw.config);
  mutate(cfg);
  fs.writeFileSync(gw.configFile, toYaml(cfg));
  gw.config = cfg;
  return cfg;
}

// Overwrites the config file with `text` as is (gw.config keeps the last valid config).
function writeRawConfig(gw, text) {
  fs.writeFileSync(gw.configFile, text);
}

// POST /admin/reload with an empty body (Content-Length: 0, like `curl -X POST -d ''`).
function postReload(gw, { token, method = 'POST' } = {}) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  return httpRequest(`${gw.url}/admin/reload`, { method, headers, body: method === 'POST' ? '' : undefined });
}

// A successful reload: 200, {"status":"ok","generation":N,"backends":K,"warnings":[strings]}.
async function reloadOk(gw, opts) {
  const res = await postReload(gw, opts);
  assert.equal(res.status, 200, `POST /admin/reload answered ${res.status}: ${res.text()}`);
  assert.match(String(res.headers['content-type']), /application\/json/);
  const j = res.json();
  assert.equal(j.status, 'ok', res.text());
  assert.ok(Number.isInteger(j.generation), `generation: ${res.text()}`);
  assert.ok(Number.isInteger(j.backends), `backends: ${res.text()}`);
  assert.ok(Array.isArray(j.warnings) && j.warnings.every((w) => typeof w === 'string'), `warnings: ${res.text()}`);
  return j;
}

// A refused reload: 400 in the OpenAI error shape, code invalid_config. Returns the error object.
async function reloadRejected(gw) {
  const res = await postReload(gw);
  assert.equal(res.status, 400, `POST /admin/reload of an invalid file answered ${res.status}: ${res.text()}`);
  const e = openAIError(res);
  assert.equal(e.type, 'invalid_request_error', res.text());
  assert.equal(e.code, 'invalid_config', res.text());
  assert.equal(e.param, null, res.text());
  return e;
}


async function adminBackends(gw, token) {
  const res = await httpRequest(`${gw.url}/admin/backends`, { headers: token ? { authorization: `Bearer ${token}` } : {} });
  assert.equal(res.status, 200, `/admin/backends: ${res.status} ${res.text()}`);
  return res.json().backends;
}

function reloadCounters(text) {
  return {
    ok: sample(text, 'llmproxy_config_reloads_total', { result: 'ok' }),
    failed: sample(text, 'llmproxy_config_reloads_total', { result: 'failed' }),
    generation: sample(text, 'llmproxy_config_generation'),
  };
}

// Polls /metrics until the reload counters satisfy `predicate` (and fails at once if the gateway
// exited meanwhile, e.g. killed by a SIGHUP it does not handle); returns the counters.
async function waitForCounters(gw, predicate, what) {
  let m;
  await waitUntil(
    async () => {
      if (!gw.running) return true;
      m = reloadCounters(await scrapeMetrics(gw));
      return predicate(m);
    },
    { timeout: 10_000, what },
  ).catch((err) => {
    throw new Error(`${err.message}; last counters ${JSON.stringify(m)}\n${gw.describe()}`);
  });
  assert.ok(gw.running, `the gateway exited (${JSON.stringify(gw.exitInfo)}) while waiting for ${what}\n${gw.describe()}`);
  return m;
}

// Waits until the gateway's stderr, from offset `from` on, has a line containing every string of
// `needles` and matching `re`; returns it. (The pipe may deliver the line a moment after the reply.)
async function stderrLine(gw, from, needles, re, what) {
  let found;
  await waitUntil(
    () => {
      found = gw.stderr
        .slice(from)
        .split('\n')
        .find((l) => needles.every((n) => l.includes(n)) && re.test(l));
      return found !== undefined;
    },
    { timeout: 5_000, what: `${what} on stderr` },
  ).catch((err) => {
    throw new Error(`${err.message}\nstderr since the reload:\n${gw.stderr.slice(from)}`);
  });
  return found;
}

function chunkEvent(k) {
  return `data: {"id":"chatcmpl-reload","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{"content":"t${k} "},"finish_reason":null}]}\n\n`;
}

// One client connection carrying several requests in turn (raw bytes, so the socket is certainly
// the same one): exchange() writes a request and resolves with the next complete response.
async function keepAliveConnection(port) {
  const socket = await connect(port);
  const events = new EventEmitter();
  let buf = Buffer.alloc(0);
  let closed = false;
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    events.emit('change');
  });
  socket.on('close', () => {
    closed = true;
    events.emit('change');
  });
  socket.on('error', () => {});
  return {
    socket,
    get closed() {
      return closed;
    },
    exchange(bytes, timeout = 10_000) {
      let check;
      return withTimeout(
        new Promise((resolve, reject) => {
          check = () => {
            let r = null;
            try {
              r = parseResponse(buf);
            } catch (err) {
              reject(err);
              return;
            }
            if (r) {
              buf = buf.subarray(r.consumed);
              resolve(r);
            } else if (closed) {
              reject(new Error(`the gateway closed the keep-alive connection (${buf.length} bytes of a response pending)`));
            }
          };
          events.on('change', check);
          if (closed) {
            check();
            return;
          }
          socket.write(bytes);
          check();
        }),
        timeout,
        'a response on the keep-alive connection',
      ).finally(() => events.off('change', check));
    },
  };
}

// ---- tests ----

test('POST /admin/reload switches the backends: generation 2, every new request goes to the new backend', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  assert.deepEqual(await tally(gw, 4), { a: 4 });

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(b, { name: 'b' })];
  });
  const j = await reloadOk(gw);
  assert.equal(j.generation, 2, JSON.stringify(j));
  assert.equal(j.backends, 1, JSON.stringify(j));
  assert.deepEqual(j.warnings, [], 'no restart-only key changed');

  assert.deepEqual(await tally(gw, 6), { b: 6 });
  const list = await adminBackends(gw);
  assert.deepEqual(
    list.map((x) => [x.name, x.url]),
    [['b', b.url]],
    `/admin/backends after the reload: ${JSON.stringify(list)}`,
  );

  // A reload of an unchanged file is a reload too: the generation counts on. It warns: an edit
  // that never reached the file (a container's single-file bind mount) looks like this.
  const again = await reloadOk(gw);
  assert.equal(again.generation, 3, JSON.stringify(again));
  assert.equal(again.backends, 1);
  assert.equal(again.warnings.length, 1, JSON.stringify(again));
  assert.match(again.warnings[0], /is unchanged since the running configuration was loaded/);
  assert.match(gw.stderr, /reload: .* is unchanged since the running configuration was loaded/);
  assert.deepEqual(await tally(gw, 2), { b: 2 });
});

test('SIGHUP reloads the file the same way', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  assert.deepEqual(await tally(gw, 3), { a: 3 });

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(b, { name: 'b' })];
  });
  // Not gw.signal(): that marks the exit as expected, and a gateway that dies of SIGHUP must fail.
  process.kill(gw.pid, 'SIGHUP');
  const m = await waitForCounters(gw, (x) => x.ok === 1, 'llmproxy_config_reloads_total{result="ok"} 1 after SIGHUP');
  assert.deepEqual(m, { ok: 1, failed: 0, generation: 2 });

  assert.deepEqual(await tally(gw, 6), { b: 6 });
  const list = await adminBackends(gw);
  assert.deepEqual(list.map((x) => x.name), ['b']);
  assert.ok(gw.running, 'the gateway exited after SIGHUP');
});

test('a stream in flight ends whole on the backend the reload removed; new requests go to the new one', { timeout: 30_000 }, async () => {
  const old = await startBackend('old');
  const release = deferred();
  const events = Array.from({ length: 6 }, (_, k) => chunkEvent(k));
  const tail = 'data: [DONE]\n\n';
  old.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    for (const e of events.slice(0, 3)) res.write(e);
    // The rest only once the test has reloaded the gateway.
    await release.promise;
    for (const e of events.slice(3)) res.write(e);
    res.end(tail);
  };
  const gw = await startGateway({ backends: [backendEntry(old, { name: 'old' })] });
  const stream = await openRawStream(gw.port, jsonPostBytes(gw.port, CHAT, chatBody('m1', { stream: true })));
  try {
    await stream.until((s) => s.text.includes('"t2 "'), 10_000, 'the first three events of the stream');

    rewriteConfig(gw, (c) => {
      c.backends = [backendEntry(b, { name: 'b' })];
    });
    const j = await reloadOk(gw);
    assert.equal(j.generation, 2);
    // While the old stream is still open, new requests already go to the new backend.
    assert.deepEqual(await tally(gw, 4), { b: 4 });
    assert.ok(!stream.ended, 'the stream ended before its backend sent the rest');
    assert.ok(!stream.socket.destroyed, 'the reload closed the client connection of the stream');

    release.resolve();
    await stream.until((s) => s.ended, 10_000, 'the end of the stream after the reload');
  } finally {
    release.resolve();
    stream.destroy();
  }
  assert.equal(stream.head.status, 200);
  assert.equal(stream.text, events.join('') + tail, 'the client received every event of the old backend');
  const { content, done } = chatStreamContent(stream.text);
  assert.equal(content, 't0 t1 t2 t3 t4 t5 ');
  assert.ok(done, 'no [DONE]');
  assert.equal(old.apiRequests.length, 1, 'the removed backend received requests after the reload');
  // The stream is counted for the backend it ran on, although that one is gone from the config.
  const streamOnOld = { path: CHAT, stream: 'true', backend: 'old', status: '200' };
  await waitUntil(async () => sample(await scrapeMetrics(gw), 'llmproxy_requests_total', streamOnOld) === 1, {
    timeout: 5_000,
    what: 'llmproxy_requests_total{backend="old",stream="true",status="200"} 1',
  });
});

test('a keep-alive client connection used before the reload carries requests after it', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const conn = await keepAliveConnection(gw.port);
  const request = () => jsonPostBytes(gw.port, CHAT, chatBody('m1'));
  for (let i = 0; i < 2; i++) {
    const r = await conn.exchange(request());
    assert.equal(r.status, 200, r.body.toString());
    assert.equal(r.headers['x-mock-backend']?.[0], 'a');
    assert.notEqual((r.headers.connection ?? []).join(',').toLowerCase(), 'close');
  }

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(b, { name: 'b' })];
  });
  await reloadOk(gw); // on a connection of its own
  assert.ok(!conn.closed, 'the reload closed an idle keep-alive client connection');

  for (let i = 0; i < 2; i++) {
    const r = await conn.exchange(request());
    assert.equal(r.status, 200, r.body.toString());
    assert.equal(r.headers['x-mock-backend']?.[0], 'b', 'a request on an old connection went to the old backend');
  }
  assert.ok(!conn.closed);

  // The same through a node:http keep-alive agent with one socket: the socket object is reused.
  const agent = keepAliveAgent();
  const sockets = new Set();
  agent.on('free', (s) => sockets.add(s));
  const viaAgent = async () => {
    const res = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
    assert.equal(res.status, 200, res.text());
    return res.headers['x-mock-backend'];
  };
  assert.equal(await viaAgent(), 'b');
  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(a, { name: 'a' })];
  });
  await reloadOk(gw);
  assert.equal(await viaAgent(), 'a');
  assert.equal(sockets.size, 1, `the agent needed ${sockets.size} connections: the reload closed its idle one`);
});

test('an invalid file changes nothing: 400 invalid_config, problems on stderr with the path, counted as failed; SIGHUP too', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const good = fs.readFileSync(gw.configFile, 'utf8');

  // 1. Not YAML.
  writeRawConfig(gw, 'listen: "127.0.0.1:0"\nbackends: [\n  - url: {\n');
  let from = gw.stderr.length;
  let e = await reloadRejected(gw);
  assert.ok(e.message.length > 0);
  await stderrLine(gw, from, [gw.configFile], /./, 'a line naming the broken file');

  // 2. YAML, but a bad URL and weight 0.
  const bad = structuredClone(gw.config);
  bad.backends = [
    { url: 'not-a-url', weight: 1, name: 'x' },
    { url: b.url, weight: 0, name: 'b' },
  ];
  writeRawConfig(gw, toYaml(bad));
  from = gw.stderr.length;
  e = await reloadRejected(gw);
  assert.match(e.message, /weight/, `the message lists the weight problem: ${e.message}`);
  assert.match(e.message, /url/i, `the message lists the url problem: ${e.message}`);
  await stderrLine(gw, from, [gw.configFile], /weight/, 'the weight problem');
  await stderrLine(gw, from, [gw.configFile], /url/i, 'the url problem');

  // Nothing changed.
  let m = reloadCounters(await scrapeMetrics(gw));
  assert.deepEqual(m, { ok: 0, failed: 2, generation: 1 });
  assert.deepEqual(await tally(gw, 4), { a: 4 });
  assert.deepEqual((await adminBackends(gw)).map((x) => x.name), ['a']);

  // 3. SIGHUP with the invalid file: counted as failed, still serving the old backends.
  from = gw.stderr.length;
  process.kill(gw.pid, 'SIGHUP');
  m = await waitForCounters(gw, (x) => x.failed === 3, 'llmproxy_config_reloads_total{result="failed"} 3 after SIGHUP');
  assert.deepEqual(m, { ok: 0, failed: 3, generation: 1 });
  await stderrLine(gw, from, [gw.configFile], /weight/, 'the weight problem after SIGHUP');
  assert.ok(gw.running, 'the gateway exited on SIGHUP with an invalid file');
  assert.deepEqual(await tally(gw, 4), { a: 4 });

  // Failed attempts used no generation: the next good reload is generation 2.
  writeRawConfig(gw, good);
  const j = await reloadOk(gw);
  assert.equal(j.generation, 2, JSON.stringify(j));
  assert.deepEqual(reloadCounters(await scrapeMetrics(gw)), { ok: 1, failed: 3, generation: 2 });
});

test('restart-only keys (listen, server.workers): 200 with one "restart" warning each, old port kept, the rest applied', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ server: { workers: 2 }, backends: [backendEntry(a, { name: 'a' })] });
  const newPort = await freePort();
  rewriteConfig(gw, (c) => {
    c.listen = `127.0.0.1:${newPort}`;
    c.server.workers = 3;
    c.backends = [backendEntry(b, { name: 'b' })];
  });
  const j = await reloadOk(gw);
  assert.equal(j.generation, 2, JSON.stringify(j));
  const listenWarnings = j.warnings.filter((w) => /(^|[^.\w])listen\b/.test(w));
  const workerWarnings = j.warnings.filter((w) => w.includes('server.workers'));
  assert.equal(listenWarnings.length, 1, `one warning for listen: ${JSON.stringify(j.warnings)}`);
  assert.equal(workerWarnings.length, 1, `one warning for server.workers: ${JSON.stringify(j.warnings)}`);
  for (const w of [...listenWarnings, ...workerWarnings]) assert.match(w, /restart/i, `warning without "restart": ${w}`);
  assert.equal(j.warnings.length, 2, `one warning per restart-only key: ${JSON.stringify(j.warnings)}`);

  // Still on the old port, with the reloadable part (backends) applied.
  assert.deepEqual(await tally(gw, 4), { b: 4 });
  await assert.rejects(
    async () => (await connect(newPort)).destroy(),
    (err) => err.code === 'ECONNREFUSED',
    `the gateway listens on the new port ${newPort} without a restart`,
  );
});

test('weights are reloaded: 1:1, then 3:1 for the same backends splits 40 requests 30/10', { timeout: 30_000 }, async () => {
  const gw = await startGateway({
    server: { workers: 1 },
    backends: [backendEntry(a, { name: 'a', weight: 1 }), backendEntry(b, { name: 'b', weight: 1 })],
  });
  const agent = keepAliveAgent();
  assert.deepEqual(await tally(gw, 4, agent), { a: 2, b: 2 });

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(a, { name: 'a', weight: 3 }), backendEntry(b, { name: 'b', weight: 1 })];
  });
  const j = await reloadOk(gw);
  assert.equal(j.backends, 2);
  assert.deepEqual(await tally(gw, 40, agent), { a: 30, b: 10 });
  const list = await adminBackends(gw);
  assert.deepEqual(
    list.map((x) => [x.name, x.weight]),
    [
      ['a', 3],
      ['b', 1],
    ],
  );
});

test('usage.sinks: a sink added by reload gets the records after it (not the older ones); a removed one gets no more', { timeout: 30_000 }, async () => {
  const audit = await startWebhook({ name: 'audit' });
  const control = await startWebhook({ name: 'control' });
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const send = async (prefix, n) => {
    const ids = Array.from({ length: n }, (_, i) => `${prefix}-${i}`);
    for (const id of ids) {
      const res = await postJson(gw.url, CHAT, chatBody('m1'), { headers: { 'x-request-id': id } });
      assert.equal(res.status, 200, `${id}: ${res.text()}`);
    }
    return ids;
  };
  const delivered = (hook, id) => hook.delivered.some((r) => r?.client_request_id === id);
  const received = (hook, prefix) => hook.records.filter((r) => String(r?.client_request_id).startsWith(prefix));

  // Logged before any sink exists.
  const early = await send('early', 2);
  await waitUntil(async () => sample(await scrapeMetrics(gw), 'llmproxy_usage_log_records_total') >= 2, {
    timeout: 10_000,
    what: 'the two early records committed to the usage log',
  });

  rewriteConfig(gw, (c) => {
    c.usage.sinks = [sinkConfig('audit', audit)];
  });
  let j = await reloadOk(gw);
  assert.deepEqual(j.warnings, [], 'usage.sinks is reloadable');
  const added = await send('added', 3);
  await audit.waitFor((h) => added.every((id) => delivered(h, id)), 10_000, 'the records made after the sink was added');
  // Delivery follows the log's order: an early record would have come first.
  assert.deepEqual(received(audit, 'early'), [], 'a sink added by reload (no replay) got records from before it');
  for (const e of audit.requests) assert.equal(e.url, '/audit');

  // Remove it; a new sink with replay: true proves delivery goes on (and replays from the start).
  rewriteConfig(gw, (c) => {
    c.usage.sinks = [sinkConfig('control', control, { replay: true })];
  });
  j = await reloadOk(gw);
  assert.deepEqual(j.warnings, []);
  const late = await send('late', 3);
  await control.waitFor(
    (h) => [...early, ...added, ...late].every((id) => delivered(h, id)),
    10_000,
    'every record (replay: true) at the control sink',
  );
  assert.deepEqual(
    received(audit, 'late').map((r) => r.client_request_id),
    [],
    'the removed sink still received records',
  );
  assert.equal(audit.delivered.length, added.length, `audit: ${audit.summary()}`);
});

test('admin.token guards /admin/reload (401 invalid_admin_token), other methods get 405 Allow: POST, the token itself reloads', { timeout: 30_000 }, async () => {
  const token = 'adm-reload-123';
  const gw = await startGateway({ admin: { token }, backends: [backendEntry(a, { name: 'a' })] });
  for (const headers of [{}, { authorization: 'Bearer wrong-token' }, { authorization: token }]) {
    const res = await httpRequest(`${gw.url}/admin/reload`, { method: 'POST', headers, body: '' });
    assert.equal(res.status, 401, `${JSON.stringify(headers)}: ${res.status} ${res.text()}`);
    assert.equal(openAIError(res).code, 'invalid_admin_token');
  }
  for (const method of ['GET', 'PUT', 'DELETE']) {
    const res = await postReload(gw, { token, method });
    assert.equal(res.status, 405, `${method} /admin/reload: ${res.status} ${res.text()}`);
    assert.equal(res.headers.allow, 'POST', `${method}: Allow ${res.headers.allow}`);
    openAIError(res);
  }
  // None of the refused requests reloaded anything.
  assert.deepEqual(reloadCounters(await scrapeMetrics(gw)), { ok: 0, failed: 0, generation: 1 });

  rewriteConfig(gw, (c) => {
    c.admin.token = 'adm-reload-456';
  });
  const j = await reloadOk(gw, { token });
  assert.equal(j.generation, 2);
  assert.equal((await httpRequest(`${gw.url}/admin/backends`, { headers: { authorization: `Bearer ${token}` } })).status, 401, 'the old token still works');
  assert.equal((await adminBackends(gw, 'adm-reload-456')).length, 1);
  assert.equal((await postReload(gw, { token })).status, 401);
  assert.equal((await reloadOk(gw, { token: 'adm-reload-456' })).generation, 3);
});

test('metrics: reload counters and generation; requests_total of a kept backend keeps counting', { timeout: 30_000 }, async () => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  let text = await scrapeMetrics(gw);
  assert.match(text, /^# TYPE llmproxy_config_reloads_total counter$/m);
  assert.match(text, /^# TYPE llmproxy_config_generation gauge$/m);
  assert.deepEqual(reloadCounters(text), { ok: 0, failed: 0, generation: 1 }, 'both counters present from the start');

  const chatA = { path: CHAT, stream: 'false', backend: 'a', status: '200' };
  assert.deepEqual(await tally(gw, 3), { a: 3 });
  text = await scrapeMetrics(gw);
  const before = sample(text, 'llmproxy_requests_total', chatA);
  assert.equal(before, 3);

  // Keep "a" (new weight), add "b" for another model only: m1 still goes to a alone.
  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(a, { name: 'a', weight: 2 }), backendEntry(b, { name: 'b', models: ['m2'] })];
  });
  const j = await reloadOk(gw);
  assert.equal(j.generation, 2);
  assert.equal(j.backends, 2);
  const bad = structuredClone(gw.config);
  bad.backends[1].weight = 0;
  writeRawConfig(gw, toYaml(bad));
  await reloadRejected(gw);

  assert.deepEqual(await tally(gw, 4), { a: 4 });
  text = await scrapeMetrics(gw);
  assert.deepEqual(reloadCounters(text), { ok: 1, failed: 1, generation: 2 });
  assert.equal(sample(text, 'llmproxy_requests_total', chatA), before + 4, 'requests_total of the kept backend');
  assert.equal(sample(text, 'llmproxy_requests_total', { ...chatA, backend: 'b' }) ?? 0, 0);
});

test('the health verdict of a backend kept with the same name and url carries over', { timeout: 30_000 }, async () => {
  const deadPort = await freePort();
  const dead = backendEntry(`http://127.0.0.1:${deadPort}`, { name: 'dead' });
  const gw = await startGateway({
    health_check: { enabled: true, interval: '200ms', timeout: '500ms', unhealthy_threshold: 2, healthy_threshold: 1 },
    // No retries: only the health verdict keeps requests away from the dead backend.
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(a, { name: 'a' }), dead],
  });
  await waitUntil(async () => (await adminBackends(gw)).find((x) => x.name === 'dead')?.healthy === false, {
    timeout: 10_000,
    what: 'the dead backend to be marked unhealthy',
  });

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(a, { name: 'a', weight: 2 }), dead];
  });
  await reloadOk(gw);
  const list = await adminBackends(gw);
  assert.equal(list.find((x) => x.name === 'dead')?.healthy, false, `the dead backend is healthy again after the reload: ${JSON.stringify(list)}`);
  assert.equal(list.find((x) => x.name === 'a')?.healthy, true);
  assert.deepEqual(await tally(gw, 10), { a: 10 });
});

test('a backend keeping its name but changing url and models: new requests reach the new url (no pooled connection to the old one)', { timeout: 30_000 }, async () => {
  // One worker, so the upstream connection pool the first requests fill is the one used after.
  const gw = await startGateway({ server: { workers: 1 }, backends: [backendEntry(a, { name: 'x', models: ['m1'] })] });
  const agent = keepAliveAgent();
  assert.deepEqual(await tally(gw, 4, agent), { a: 4 });

  rewriteConfig(gw, (c) => {
    c.backends = [backendEntry(b, { name: 'x', models: ['m2'] })];
  });
  await reloadOk(gw);
  const list = await adminBackends(gw);
  assert.deepEqual(list.map((x) => [x.name, x.url]), [['x', b.url]]);
  assert.deepEqual(list[0].models, ['m2']);
  for (let i = 0; i < 4; i++) {
    const res = await postJson(gw.url, CHAT, chatBody('m2'), { agent });
    assert.equal(res.status, 200, res.text());
    assert.equal(res.headers['x-mock-backend'], 'b', `request ${i} after the url change went to ${res.headers['x-mock-backend']}`);
  }
  const gone = await postJson(gw.url, CHAT, chatBody('m1'), { agent });
  assert.equal(gone.status, 404, `a model no backend serves any more: ${gone.status} ${gone.text()}`);
  assert.equal(openAIError(gone).code, 'model_not_found');
  const models = await httpRequest(`${gw.url}/v1/models`);
  assert.deepEqual(models.json().data.map((m) => m.id), ['m2']);
});

test('timeouts, load_balancing and health_check take effect on reload', { timeout: 30_000 }, async () => {
  const deadPort = await freePort();
  const dead = backendEntry(`http://127.0.0.1:${deadPort}`, { name: 'dead' });
  const gw = await startGateway({
    server: { workers: 1 },
    load_balancing: { strategy: 'weighted_round_robin', max_retries: 0 },
    backends: [dead, backendEntry(a, { name: 'a' })],
  });
  // No retries, no health checks: round robin sends every other request to the dead backend.
  const t0 = await tally(gw, 4);
  assert.equal(t0.a, 2, JSON.stringify(t0));

  // max_retries 1: the refused connections are retried on a.
  rewriteConfig(gw, (c) => {
    c.load_balancing.max_retries = 1;
  });
  await reloadOk(gw);
  assert.deepEqual(await tally(gw, 6), { a: 6 });

  // Back to no retries, with health checks on: the dead backend leaves the rotation.
  rewriteConfig(gw, (c) => {
    c.load_balancing.max_retries = 0;
    c.health_check.enabled = true;
  });
  await reloadOk(gw);
  await waitUntil(async () => (await adminBackends(gw)).find((x) => x.name === 'dead')?.healthy === false, {
    timeout: 10_000,
    what: 'health checks (enabled by the reload) to mark the dead backend down',
  });
  assert.deepEqual(await tally(gw, 6), { a: 6 });

  // timeouts.first_byte: 10 s -> 300 ms; a 1.5 s prefill now times out.
  const slow = () => postJson(gw.url, CHAT, chatBody('m1'), { headers: { 'x-mock-ttft-ms': '1500' } });
  assert.equal((await slow()).status, 200);
  rewriteConfig(gw, (c) => {
    c.timeouts.first_byte = '300ms';
  });
  await reloadOk(gw);
  const timedOut = await slow();
  assert.equal(timedOut.status, 504, `first_byte 300ms after the reload: ${timedOut.status} ${timedOut.text()}`);
});

test('a reload that turns health checks off brings back a backend they had marked down', { timeout: 30_000 }, async () => {
  const sick = await startBackend('sick');
  sick.healthStatus = 503; // its API answers, its health check does not
  const gw = await startGateway({
    server: { workers: 1 },
    health_check: { enabled: true, interval: '100ms', unhealthy_threshold: 1, healthy_threshold: 1 },
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(sick, { name: 'sick' })],
  });
  await waitUntil(async () => (await adminBackends(gw))[0].healthy === false, { timeout: 10_000, what: 'sick to be marked down' });
  assert.equal((await postJson(gw.url, CHAT, chatBody('m1'))).status, 503);
  rewriteConfig(gw, (c) => {
    c.health_check.enabled = false;
  });
  await reloadOk(gw);
  // Nothing would ever check it again: it must be up now.
  assert.equal((await adminBackends(gw))[0].healthy, true);
  const res = await postJson(gw.url, CHAT, chatBody('m1'));
  assert.equal(res.status, 200, res.text());
  assert.equal(res.headers['x-mock-backend'], 'sick');
});

test('requests still on the old generation that fail after a reload turned health checks off do not mark their backend down', { timeout: 30_000 }, async () => {
  const flaky = await startBackend('flaky');
  const release = deferred();
  flaky.handler = async (req, res) => {
    if (req.headers['x-request-id']?.startsWith('old-')) {
      await release.promise;
      req.socket.destroy(); // reset before any answer: a passive failure of the backend
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ id: 'c', object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }] }));
  };
  const gw = await startGateway({
    server: { workers: 1 },
    health_check: { enabled: true, interval: '100ms', unhealthy_threshold: 1, healthy_threshold: 1 },
    load_balancing: { max_retries: 0 },
    backends: [backendEntry(flaky, { name: 'flaky' })],
  });
  const inFlight = ['old-1', 'old-2'].map((id) => postJson(gw.url, CHAT, chatBody('m1'), { headers: { 'x-request-id': id } }));
  await waitUntil(async () => flaky.apiRequests.length === 2, { timeout: 10_000, what: 'both requests at the backend' });
  rewriteConfig(gw, (c) => {
    c.health_check.enabled = false;
  });
  await reloadOk(gw);
  release.resolve();
  for (const res of await Promise.all(inFlight)) assert.equal(res.status, 502, res.text());
  // Nothing checks the backend any more: those failures must not have marked it down.
  assert.equal((await adminBackends(gw))[0].healthy, true);
  const res = await postJson(gw.url, CHAT, chatBody('m1'));
  assert.equal(res.status, 200, res.text());
});

test('usage_hook, usage.api_key and usage.user_header are reloaded; the hook added by reload starts at the log head', { timeout: 30_000 }, async () => {
  const hook = await startWebhook({ name: 'hook' });
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const key = 'sk-reload-0123456789abcd';
  const send = async (id) => {
    const res = await postJson(gw.url, CHAT, chatBody('m1'), {
      headers: { 'x-request-id': id, authorization: `Bearer ${key}`, 'x-user-id': 'by-user-id', 'x-tenant': 'by-tenant' },
    });
    assert.equal(res.status, 200, res.text());
  };
  await send('hook-before');
  await waitUntil(async () => sample(await scrapeMetrics(gw), 'llmproxy_usage_log_records_total') >= 1, {
    timeout: 10_000,
    what: 'the first record committed to the usage log',
  });

  rewriteConfig(gw, (c) => {
    c.usage_hook = hookConfig(hook);
    c.usage.api_key = 'masked';
    c.usage.user_header = 'X-Tenant';
  });
  const j = await reloadOk(gw);
  assert.deepEqual(j.warnings, []);
  await send('hook-after');
  const rec = await hook.waitForClientId('hook-after', 10_000);
  assert.equal(rec.api_key, 'sk-rel...abcd', `api_key after reloading usage.api_key: masked: ${JSON.stringify(rec)}`);
  assert.equal(rec.user_id, 'by-tenant', `user_id after reloading usage.user_header: ${JSON.stringify(rec)}`);
  assert.equal(hook.records.filter((r) => r?.client_request_id === 'hook-before').length, 0, 'the hook added by reload got a record from before it');
  for (const e of hook.requests) assert.equal(e.url, '/usage');
});

test('reloads under load: every request answered 200 (streams whole), generations counted exactly, no crash', { timeout: 60_000 }, async (t) => {
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const layouts = [
    [backendEntry(b, { name: 'b' })],
    [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })],
    [backendEntry(a, { name: 'a', weight: 3 })],
  ];
  const total = 240;
  let completed = 0;
  const failures = [];
  const load = mapLimit(
    Array.from({ length: total }, (_, i) => i),
    8,
    async (i) => {
      const stream = i % 3 === 0;
      try {
        const res = await postJson(gw.url, CHAT, chatBody('m1', { stream }), { headers: { 'x-mock-tokens': '5' } });
        if (res.status !== 200) failures.push(`request ${i}: HTTP ${res.status} ${res.text().slice(0, 200)}`);
        else if (stream) {
          const { content, done } = chatStreamContent(res.text());
          if (content !== mockTokens(5) || !done) failures.push(`stream ${i}: ${JSON.stringify(res.text().slice(-200))}`);
        }
      } catch (err) {
        failures.push(`request ${i}: ${err.message}`);
      }
      completed++;
    },
  );
  const generations = [];
  let loadDone = false;
  load.finally(() => {
    loadDone = true;
  });
  for (let k = 0; k < 12 && !loadDone; k++) {
    rewriteConfig(gw, (c) => {
      c.backends = layouts[k % layouts.length];
    });
    if (k % 4 === 3) {
      // A SIGHUP now and then; its generation shows in the gauge.
      const before = generations.length + 1;
      process.kill(gw.pid, 'SIGHUP');
      await waitForCounters(gw, (m) => m.ok === before, `SIGHUP reload ${before} under load`);
      generations.push(null);
    } else {
      generations.push((await reloadOk(gw)).generation);
    }
    // Spread the reloads over the load: the next one after ~20 more requests.
    const next = Math.min(total, completed + 20);
    await waitUntil(() => completed >= next || loadDone, { timeout: 20_000, interval: 5, what: `${next} requests completed` });
  }
  await withTimeout(load, 30_000, 'the load to finish');
  assert.deepEqual(failures, [], `${failures.length} of ${total} requests failed`);
  const n = generations.length;
  t.diagnostic(`${n} reloads during ${total} requests`);
  assert.ok(n >= 3, `only ${n} reloads happened during the load: make it longer`);
  generations.forEach((g, i) => {
    if (g !== null) assert.equal(g, i + 2, `reload ${i + 1} answered generation ${g}`);
  });
  assert.deepEqual(reloadCounters(await scrapeMetrics(gw)), { ok: n, failed: 0, generation: n + 1 });
});

test('the weighted rotation continues across reloads: weights 1:1 with a reload before each request split 5:5', async () => {
  const gw = await startGateway({ server: { workers: 1 }, backends: [backendEntry(a, { name: 'a' }), backendEntry(b, { name: 'b' })] });
  const counts = { a: 0, b: 0 };
  for (let i = 0; i < 10; i++) {
    await reloadOk(gw);
    const res = await postJson(gw.url, CHAT, chatBody());
    assert.equal(res.status, 200, res.text());
    counts[res.headers['x-mock-backend']]++;
  }
  // Each reload restarted the rotation before: every request went to the first backend.
  assert.deepEqual(counts, { a: 5, b: 5 });
});

test('a valid file the gateway cannot apply (a new sink whose cursor cannot be stored: the log locked by another process) is 500 reload_failed, and nothing changes', { timeout: 60_000 }, async (t) => {
  const late = await startWebhook({ name: 'late' });
  const gw = await startGateway({ backends: [backendEntry(a, { name: 'a' })] });
  const res0 = await postJson(gw.url, CHAT, chatBody('m1'));
  assert.equal(res0.status, 200, res0.text());
  await waitUntil(async () => sample(await scrapeMetrics(gw), 'llmproxy_usage_log_records_total') >= 1, { timeout: 10_000, what: 'a record committed' });
  // Another process holds the log's write lock (the sqlite3 shell, a test dependency).
  const holder = spawn('sqlite3', [gw.config.usage.log_path], { stdio: ['pipe', 'pipe', 'pipe'] });
  const spawned = await new Promise((resolve) => {
    holder.once('spawn', () => resolve(null));
    holder.once('error', (err) => resolve(err));
  });
  if (spawned) {
    t.skip(`no sqlite3 shell: ${spawned.message}`);
    return;
  }
  const exited = new Promise((resolve) => holder.once('close', resolve));
  let out = '';
  holder.stdout.on('data', (d) => (out += d));
  holder.stdin.write("BEGIN IMMEDIATE;\nSELECT 'locked';\n");
  await waitUntil(() => out.includes('locked'), { timeout: 10_000, what: 'the sqlite3 shell to hold the lock' });
  rewriteConfig(gw, (c) => {
    c.usage.sinks = [sinkConfig('late', late)];
  });
  const res = await postReload(gw);
  holder.stdin.end('COMMIT;\n');
  await withTimeout(exited, 10_000, 'the sqlite3 shell to exit');
  assert.equal(res.status, 500, res.text());
  const e = openAIError(res);
  assert.equal(e.type, 'server_error');
  assert.equal(e.code, 'reload_failed');
  assert.match(e.message, /^The configuration could not be applied; nothing was changed: usage sink/);
  assert.equal(reloadCounters(await scrapeMetrics(gw)).failed, 1);
  // The same file, with the lock gone, applies.
  await reloadOk(gw);
});

test('a replaced generation is freed at once, not after its health check interval: 1,000 reloads with interval 1h keep the memory flat', {
  timeout: 120_000,
  skip: gatewaySanitized() && 'AddressSanitizer keeps freed memory in quarantine',
}, async () => {
  const gw = await startGateway({
    server: { workers: 1 },
    health_check: { enabled: true, interval: '1h', timeout: '2s' },
    backends: [backendEntry(a, { name: 'a' })],
  });
  const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${gw.pid}/status`, 'utf8'))[1]);
  const agent = keepAliveAgent({ maxSockets: 1 });
  const reload = async () => {
    const res = await httpRequest(`${gw.url}/admin/reload`, { method: 'POST', body: '', agent });
    assert.equal(res.status, 200, res.text());
  };
  for (let i = 0; i < 50; i++) await reload();  // the allocator's pools settle first
  const before = rss();
  for (let i = 0; i < 1000; i++) await reload();
  const grown = rss() - before;
  // Each generation a health loop kept alive for its hour held ~4 KiB: ~4 MB here.
  assert.ok(grown < 1500, `RSS grew by ${grown} KiB over 1,000 reloads`);
});

test('a backend a reload removed keeps the series that hold counts, and no empty ones: renaming at every reload adds none', async () => {
  const gw = await startGateway({ server: { workers: 1 }, backends: [backendEntry(a, { name: 'r0' })] });
  const res = await postJson(gw.url, CHAT, chatBody());
  assert.equal(res.status, 200, res.text());
  for (let i = 1; i <= 20; i++) {
    rewriteConfig(gw, (c) => {
      c.backends = [backendEntry(a, { name: `r${i}` })];
    });
    await reloadOk(gw);
  }
  const text = await scrapeMetrics(gw);
  const labelled = (name) => new Set([...text.matchAll(/backend="(r\d+)"/g)].map((m) => m[1]).filter((n) => n === name));
  // r0 served a request: its request counter stays; r1..r19 never did: nothing of them is left.
  assert.equal(sample(text, 'llmproxy_requests_total', { path: '/v1/chat/completions', stream: 'false', backend: 'r0', status: '200' }), 1);
  for (let i = 1; i < 20; i++) assert.equal(labelled(`r${i}`).size, 0, `series left for r${i}`);
  assert.equal(sample(text, 'llmproxy_backend_up', { backend: 'r20' }), 1);
  assert.ok(/llmproxy_upstream_errors_total\{backend="r20",kind="connect"\} 0/.test(text), 'the current backend keeps its zero series');
});
