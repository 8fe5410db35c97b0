// Metering at the edges found in review: a 504 sent from inside an attempt is one record, not
// two; a stream still running at the drain deadline is cut but still recorded; an event stream
// the backend sends with Content-Length loses the injected usage chunk like a chunked one.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import { spawn } from 'node:child_process';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  startBackend,
  startWebhook,
  backendEntry,
  postJson,
  chatBody,
  openStream,
  restartGateway,
  sseData,
  LLMPROXY_BIN,
  writeTempFile,
  gatewayConfig,
  toYaml,
  waitUntil,
  readAll,
  mockPathCount,
  withTimeout,
  deferred,
  delay,
} from './lib/harness.mjs';
import { startUsageGateway, mapLimit, hookConfig, scrapeMetrics, metricSum } from './lib/usage.mjs';

let mock;
let receiver;

// A non-stream chat answer as servers write it, with `usage` last when given.
const chatAnswer = (content, usage) =>
  JSON.stringify({ id: 'x', object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }], ...(usage ? { usage } : {}) });

before(async () => {
  mock = await startMock({ name: 'mk' });
  receiver = await startWebhook({ name: 'edges' });
});
beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

test('a first-byte timeout (504) makes exactly one record', { timeout: 30_000 }, async () => {
  const gw = await startUsageGateway({ mock, receiver, timeouts: { first_byte: '300ms' } });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-504', 'x-mock-ttft-ms': '3000' } });
  assert.equal(res.status, 504);
  // A later request from the same client connection pool: once its record is here, the 504's
  // records (one, or a wrong second one) were committed before it.
  const fence = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-504-fence' } });
  assert.equal(fence.status, 200);
  await receiver.waitForClientId('edge-504-fence', 10_000);
  const recs = receiver.delivered.filter((r) => r.client_request_id === 'edge-504');
  assert.equal(recs.length, 1, `records of the 504: ${JSON.stringify(recs)}`);
  assert.equal(recs[0].finish, 'timeout');
  assert.equal(recs[0].status_code, 504);
  assert.equal(recs[0].prompt_tokens, 0, 'the backend never answered: nothing billed');
});

test('a header, then the answer fails before any of its body: 502 or 504 in the OpenAI shape, not an empty reply; nothing billed', { timeout: 30_000 }, async () => {
  const be = await startBackend('headonly');
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'ho' })], timeouts: { stream_idle: '500ms' }, usage: { tokenize: false } });
  const header = 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n';
  const cases = {
    'head-reset': { answer: (req) => req.socket.write(header, () => req.socket.resetAndDestroy()), status: 502, code: 'upstream_error', finish: 'upstream_error', message: /cut short/ },
    'head-close': { answer: (req) => req.socket.end(header), status: 502, code: 'upstream_error', finish: 'upstream_error', message: /cut short/ },
    'head-silent': { answer: (req) => req.socket.write(header), status: 504, code: 'upstream_timeout', finish: 'timeout', message: /response header, then nothing within 500 ms/ },
  };
  for (const [id, c] of Object.entries(cases)) {
    be.handler = async (req) => c.answer(req);
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } });
    assert.equal(res.status, c.status, `${id}: ${res.text().slice(0, 300)}`);
    const err = res.json().error;
    assert.equal(err.code, c.code, id);
    assert.equal(err.type, 'server_error', id);
    assert.equal(err.param, null, id);
    assert.match(err.message, c.message, id);
    const rec = await receiver.waitForClientId(id, 15_000);
    assert.equal(rec.status_code, c.status, id);
    assert.equal(rec.finish, c.finish, id);
    assert.equal(rec.prompt_tokens, 0, `${id}: no answer reached the client, nothing billed`);
    assert.equal(rec.completion_tokens, 0, id);
  }
  // The client's connection was answered cleanly, and the backend works again.
  be.handler = null;
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
});

test('a client that leaves in the middle of a non-stream answer: the rest is read for its usage, which is billed as the backend reported it', { timeout: 30_000 }, async () => {
  const be = await startBackend('bigbody');
  let clientGone;
  const gone = new Promise((resolve) => (clientGone = resolve));
  const content = 'a'.repeat(300_000);
  const body = chatAnswer(content, { prompt_tokens: 11, completion_tokens: 75_000, total_tokens: 75_011 });
  be.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.write(body.slice(0, 100_000));
    await gone; // the rest, with the usage at its end, only once the client has hung up
    res.end(body.slice(100_000));
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'bb' })] });
  await new Promise((resolve, reject) => {
    const req = http.request(`${gw.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-request-id': 'edge-left-mid-body' } }, (res) => {
      assert.equal(res.statusCode, 200);
      res.once('data', () => {
        req.destroy();
        resolve();
      });
    });
    req.on('error', () => {});
    req.once('error', reject);
    req.end(JSON.stringify(chatBody('m1')));
  });
  clientGone();
  const rec = await receiver.waitForClientId('edge-left-mid-body', 15_000);
  assert.equal(rec.finish, 'client_disconnected');
  assert.equal(rec.usage_source, 'backend', JSON.stringify(rec));
  assert.equal(rec.prompt_tokens, 11);
  assert.equal(rec.completion_tokens, 75_000);
  // The upstream connection was read to its end: it serves the next request.
  be.handler = null;
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
});

test('a non-stream error answered with 200 (a server\'s error object, no usage) bills nothing and says upstream_error', { timeout: 30_000 }, async () => {
  const be = await startBackend('err200');
  const bodies = {
    'err200-vllm-old': { object: 'error', message: 'engine dead', type: 'InternalServerError', param: null, code: 500 },
    'err200-openai': { error: { message: 'CUDA out of memory', type: 'server_error', param: null, code: null } },
  };
  be.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(bodies[req.headers['x-request-id']]));
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'e2' })], usage: { tokenize: false } });
  for (const [id, body] of Object.entries(bodies)) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } });
    assert.equal(res.status, 200, 'relayed as the backend sent it');
    assert.deepEqual(res.json(), body);
    const rec = await receiver.waitForClientId(id, 15_000);
    assert.equal(rec.status_code, 200, id);
    assert.equal(rec.finish, 'upstream_error', id);
    assert.equal(rec.usage_source, 'estimated', id);
    assert.equal(rec.prompt_tokens, 0, `${id}: ${JSON.stringify(rec)}`);
    assert.equal(rec.completion_tokens, 0, id);
  }
});

// The record of client request `id` of a gateway that has exited: delivered before the exit, or
// committed but not yet delivered, and then delivered from the log by the next start.
async function recordAfterExit(gw, id) {
  const rec = receiver.delivered.find((r) => r.client_request_id === id);
  if (rec) return rec;
  const gw2 = await restartGateway(gw);
  const later = await receiver.waitForClientId(id, 15_000);
  gw2.signal('SIGTERM');
  assert.deepEqual(await gw2.waitExit(20_000), { code: 0, signal: null }, `the restarted gateway\n${gw2.describe()}`);
  return later;
}

test('a stream still running at the drain deadline is cut and still recorded', { timeout: 60_000 }, async () => {
  const gw = await startUsageGateway({ mock, receiver, server: { drain_timeout: '500ms' } });
  const { res } = await openStream(`${gw.url}/v1/chat/completions`, {
    headers: { 'content-type': 'application/json', 'x-request-id': 'edge-drain', 'x-mock-tokens': '200', 'x-mock-delay-ms': '50' },
    body: JSON.stringify(chatBody('m1', { stream: true })),
  });
  // Wait for the first token, so that the stream is well under way.
  await new Promise((resolve, reject) => {
    res.once('data', resolve);
    res.once('error', reject);
  });
  res.on('data', () => {});
  res.on('error', () => {});
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(20_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
  const rec = await recordAfterExit(gw, 'edge-drain');
  assert.equal(rec.finish, 'timeout');
  assert.equal(rec.is_stream, true);
  assert.ok(rec.completion_tokens > 0 && rec.completion_tokens < 200, `completion_tokens ${rec.completion_tokens}`);
});

test('a /tokenize call still running at the drain deadline is cut: the record is logged with the local estimate', { timeout: 60_000 }, async () => {
  const be = await startBackend('hangtok');
  let tokenizeCalls = 0;
  be.handler = async (req, res) => {
    if (req.url === '/tokenize') {
      tokenizeCalls++;
      return; // never answers: only the gateway's own deadlines end this call
    }
    // An answer without usage: the prompt is counted by /tokenize, after the response.
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(chatAnswer('hi there'));
  };
  // /tokenize may take health_check.timeout + timeouts.connect (8 s here): far past the cut's grace.
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'ht' })], health_check: { timeout: '5s' }, server: { drain_timeout: '500ms' } });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-drain-tokenize' } });
  assert.equal(res.status, 200);
  await waitUntil(() => tokenizeCalls > 0, { timeout: 10_000, what: 'the /tokenize call' });
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(20_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
  assert.match(gw.stderr, /drain timeout: cutting 1 connections/);
  const rec = await recordAfterExit(gw, 'edge-drain-tokenize');
  assert.equal(rec.finish, 'completed', 'the response had ended: only the count of its prompt was cut');
  assert.equal(rec.status_code, 200);
  assert.equal(rec.usage_source, 'estimated');
  assert.ok(rec.prompt_tokens > 0, JSON.stringify(rec));
  assert.ok(rec.completion_tokens > 0, JSON.stringify(rec));
});

test('requests with no content yet at the drain deadline (waiting for the answer, a stream with only its headers) are cut, recorded "timeout", and not billed', { timeout: 60_000 }, async () => {
  const gw = await startUsageGateway({ mock, receiver, server: { drain_timeout: '500ms' } });
  const before = await mockPathCount(mock, '/v1/chat/completions');
  const pending = postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-drain-wait', 'x-mock-ttft-ms': '10000' } }).then(
    (r) => ({ status: r.status }),
    (e) => ({ error: e.code ?? e.message }),
  );
  // The mock sends a stream's headers at once, its first token after ttft_ms.
  const stream = await openStream(`${gw.url}/v1/chat/completions`, {
    headers: { 'content-type': 'application/json', 'x-request-id': 'edge-drain-headers', 'x-mock-ttft-ms': '10000' },
    body: JSON.stringify(chatBody('m1', { stream: true })),
  });
  assert.equal(stream.res.statusCode, 200);
  stream.res.on('data', () => {});
  stream.res.on('error', () => {});
  await waitUntil(async () => (await mockPathCount(mock, '/v1/chat/completions')) >= before + 2, { timeout: 10_000, what: 'both requests at the backend' });
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(20_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
  const answer = await pending;
  assert.ok(answer.error || answer.status >= 500, `the client got no answer of the backend's: ${JSON.stringify(answer)}`);
  for (const id of ['edge-drain-wait', 'edge-drain-headers']) {
    const rec = await recordAfterExit(gw, id);
    assert.equal(rec.finish, 'timeout');
    // The gateway, not the client, ended it before any content: the client is not billed for it.
    assert.equal(rec.prompt_tokens, 0, JSON.stringify(rec));
    assert.equal(rec.completion_tokens, 0);
  }
});

test('an event stream sent with Content-Length: the injected usage chunk is removed and the body re-framed', { timeout: 30_000 }, async () => {
  const backend = await startBackend('cl-sse');
  const events = [
    { id: 'c', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content: 'hi' }, finish_reason: null }] },
    { id: 'c', object: 'chat.completion.chunk', choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] },
    { id: 'c', object: 'chat.completion.chunk', choices: [], usage: { prompt_tokens: 7, completion_tokens: 1, total_tokens: 8 } },
  ];
  const body = Buffer.from(events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('') + 'data: [DONE]\n\n');
  let upstreamBody = null;
  backend.handler = async (req, res, reqBody) => {
    upstreamBody = JSON.parse(reqBody.toString());
    res.writeHead(200, { 'content-type': 'text/event-stream', 'content-length': body.length });
    res.end(body);
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'cl' })] });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-request-id': 'edge-cl' } });
  assert.equal(res.status, 200);
  assert.equal(upstreamBody.stream_options.include_usage, true, 'the gateway asked the backend for usage');
  assert.equal(res.headers['content-length'], undefined, 'the length changed: the body is chunked now');
  const data = sseData(res.text());
  assert.deepEqual(data, [JSON.stringify(events[0]), JSON.stringify(events[1]), '[DONE]']);
  const rec = await receiver.waitForClientId('edge-cl', 10_000);
  assert.equal(rec.prompt_tokens, 7);
  assert.equal(rec.completion_tokens, 1);
  assert.equal(rec.usage_source, 'backend');
});

test('a non-stream body over usage.max_response_copy is billed from its usage, written last, first or in the middle', { timeout: 60_000 }, async () => {
  const backend = await startBackend('big-body');
  const usage = { prompt_tokens: 210, completion_tokens: 14, total_tokens: 224 };
  const content = 'x'.repeat(1_500_000);
  backend.handler = async (req, res) => {
    const where = req.headers['x-usage-at'];
    const choices = [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }];
    // vLLM writes prompt_logprobs and prompt_token_ids after usage: with a long prompt, far more
    // than the copy's tail.
    const promptTokenIds = Array.from({ length: 300_000 }, (_, i) => i % 50_000);
    const body =
      where === 'first'
        ? JSON.stringify({ usage, id: 'c', object: 'chat.completion', choices })
        : where === 'middle'
          ? JSON.stringify({ id: 'c', object: 'chat.completion', choices, usage, prompt_logprobs: null, prompt_token_ids: promptTokenIds })
          : where === 'middle-word'
            ? // the word "usage" as a value after it (a prompt token), far past the copy's tail
              JSON.stringify({ id: 'c', object: 'chat.completion', choices, usage, prompt_logprobs: Array.from({ length: 6000 }, (_, i) => ({ [i]: { logprob: -0.5, rank: 1, decoded_token: 'usage' } })), prompt_token_ids: promptTokenIds })
            : JSON.stringify({ id: 'c', object: 'chat.completion', choices, usage });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'big' })] });
  for (const [id, at] of [['big-last', 'last'], ['big-first', 'first'], ['big-middle', 'middle'], ['big-middle-word', 'middle-word']]) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id, 'x-usage-at': at } });
    assert.equal(res.status, 200);
    assert.equal(JSON.parse(res.text()).choices[0].message.content.length, content.length);
    const rec = await receiver.waitForClientId(id, 10_000);
    assert.equal(rec.usage_source, 'backend', `${id}: ${JSON.stringify(rec)}`);
    assert.equal(rec.prompt_tokens, usage.prompt_tokens, id);
    assert.equal(rec.completion_tokens, usage.completion_tokens, id);
  }
});

test('a second gateway on the same usage log waits for the first to exit, then takes over the log', { timeout: 60_000 }, async () => {
  const first = await startUsageGateway({ mock, receiver });
  const logPath = first.config.usage.log_path;
  const yaml = toYaml(gatewayConfig({ backends: [backendEntry(mock, { name: 'mk' })], usage_hook: hookConfig(receiver), usage: { log_path: logPath } }));
  const second = spawn(LLMPROXY_BIN, ['--config', writeTempFile('second.yaml', yaml)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  second.stdout.on('data', (d) => (out += d));
  second.stderr.on('data', (d) => (err += d));
  const exited = new Promise((resolve) => second.once('exit', resolve));
  try {
    await waitUntil(() => new RegExp(`is in use by another gateway process \\(pid ${first.pid}\\); waiting up to 60 s`).test(err), {
      timeout: 15_000,
      what: 'the second gateway waiting for the log',
    });
    assert.doesNotMatch(out, /listening on/, 'the second gateway ran beside the first');
    // `kill -HUP $(pidof llmproxy)`, meant for the running gateway, reaches the waiting one too:
    // it must not end it. The first reloads (its answer to SIGHUP, logged) meanwhile.
    second.kill('SIGHUP');
    first.signal('SIGHUP');
    first.exitExpected = false;  // a reload, not an end
    await waitUntil(() => /reloaded /.test(first.stderr + first.stdout), { timeout: 15_000, what: 'the first gateway reloading' });
    // The signal, had it not been ignored, has ended the second process by the time the first
    // (signalled after it) finished its reload.
    assert.equal(second.exitCode, null, `the waiting gateway died of SIGHUP: ${second.signalCode}`);
    // The first still meters meanwhile; then it stops, and the second starts on the same log.
    assert.equal((await postJson(first.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-lock-1' } })).status, 200);
    first.signal('SIGTERM');
    assert.deepEqual(await first.waitExit(20_000), { code: 0, signal: null }, first.describe());
    await waitUntil(() => /listening on http:\/\/127\.0\.0\.1:(\d+)/.test(out), { timeout: 15_000, what: 'the second gateway listening' });
    const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(out)[1]);
    assert.equal((await postJson(`http://127.0.0.1:${port}`, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-lock-2' } })).status, 200);
    await receiver.waitForClientId('edge-lock-1', 15_000);
    await receiver.waitForClientId('edge-lock-2', 15_000);
  } finally {
    second.kill('SIGKILL');
    await exited;
  }
});

test('a damaged usage log: the sink delivers up to the damage, then says the file is damaged and where', { timeout: 60_000 }, async () => {
  // Records logged with no sink, the gateway stopped cleanly (the WAL is folded into the file).
  const first = await startUsageGateway({ mock });
  const logPath = first.config.usage.log_path;
  await mapLimit([...Array(3000).keys()], 16, async (i) => {
    const res = await postJson(first.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': `dmg-${i}` } });
    assert.equal(res.status, 200);
  });
  first.signal('SIGTERM');
  assert.deepEqual(await first.waitExit(20_000), { code: 0, signal: null }, first.describe());
  assert.ok(!fs.existsSync(`${logPath}-wal`), 'the WAL was checkpointed at exit');
  const pages = fs.statSync(logPath).size / 4096;
  assert.ok(pages > 120, `a log of ${pages} pages`);
  // 0xA5 over pages 60-89, records in the middle of the log: no valid page type, no valid
  // overflow pointer, so SQLite finds the damage wherever the pages fall.
  const fd = fs.openSync(logPath, 'r+');
  fs.writeSync(fd, Buffer.alloc(30 * 4096, 0xa5), 0, 30 * 4096, 60 * 4096);
  fs.closeSync(fd);

  // A sink that replays the log from its start reaches the damage.
  const hook = await startWebhook({ name: 'damaged' });
  const gw = await startUsageGateway({ mock, receiver: hook, hook: { replay: true }, usage: { log_path: logPath } });
  await waitUntil(() => /the usage log file is damaged/.test(gw.stderr), { timeout: 20_000, what: 'the damage reported' });
  const m = /usage sink usage_hook: the usage log file is damaged: the records after seq (\d+) cannot be read/.exec(gw.stderr);
  assert.ok(m, gw.stderr.slice(-2000));
  const stuckAt = Number(m[1]);
  assert.ok(stuckAt > 0 && stuckAt < 3000, `stuck after seq ${stuckAt}`);
  // Every record before the damage was delivered, exactly the ones up to that seq.
  await hook.waitFor((h) => h.records.length >= stuckAt, 15_000, `the ${stuckAt} records before the damage`);
  assert.equal(new Set(hook.records.map((r) => r.request_id)).size, stuckAt);
  // The gateway goes on serving (and logging) meanwhile.
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
});

test('event boundaries in any line ending: a stream_idle cut after a CR-only event gets the error event; a response ended inside an event is not "completed"', { timeout: 30_000 }, async () => {
  const be = await startBackend('cr');
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'cr' })], timeouts: { stream_idle: '500ms' } });
  const event = 'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}';
  const usageEvent = 'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}';
  be.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    if (req.headers['x-request-id'] === 'edge-cr') {
      res.write(`${event}\r\r`); // then silence past stream_idle
    } else if (req.headers['x-request-id'] === 'edge-done') {
      res.end(`${event}\n\ndata: [DONE]\n`); // the end marker without its blank line
    } else if (req.headers['x-request-id'] === 'edge-usage-cut') {
      res.end(`${event}\n\n${usageEvent}`); // the usage chunk without its blank line
    } else if (req.headers['x-request-id'] === 'edge-done-in-event') {
      res.end(`${event}\n\ndata: {"id":"c1","choi\ndata: [DONE]\n`); // [DONE] inside a cut event
    } else {
      res.end(`${event}\n\ndata: {"id":"c1","choi`); // a whole chunked message, cut inside an event
    }
  };
  const body = JSON.stringify(chatBody('m1', { stream: true }));
  const cr = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': 'edge-cr' }, body });
  // The cut leaves the chunked message unfinished: read to the connection's close.
  const crText = await new Promise((resolve) => {
    let text = '';
    cr.res.on('data', (d) => (text += d));
    cr.res.on('error', () => {});
    cr.res.on('close', () => resolve(text));
  });
  assert.ok(!cr.res.complete, 'the cut stream must not end cleanly');
  assert.ok(crText.startsWith(`${event}\r\r`), crText);
  assert.match(crText, /"code":"upstream_timeout"/);
  assert.equal((await receiver.waitForClientId('edge-cr', 15_000)).finish, 'timeout');

  const cut = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': 'edge-cut' }, body });
  assert.equal((await readAll(cut.res)).toString(), `${event}\n\ndata: {"id":"c1","choi`, 'relayed as the backend sent it');
  const rec = await receiver.waitForClientId('edge-cut', 15_000);
  assert.equal(rec.finish, 'upstream_error');
  assert.equal(rec.status_code, 200);
  // "data: [DONE]" with one newline only: the stream is complete all the same.
  const done = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': 'edge-done' }, body });
  assert.equal((await readAll(done.res)).toString(), `${event}\n\ndata: [DONE]\n`);
  assert.equal((await receiver.waitForClientId('edge-done', 15_000)).finish, 'completed');
  // A usage chunk without its blank line: relayed as it came (clients drop it), the stream did
  // not complete, and the usage in it is still the backend's count.
  const usageCut = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': 'edge-usage-cut' }, body });
  assert.equal((await readAll(usageCut.res)).toString(), `${event}\n\n${usageEvent}`);
  const usageRec = await receiver.waitForClientId('edge-usage-cut', 15_000);
  assert.deepEqual([usageRec.finish, usageRec.usage_source, usageRec.prompt_tokens, usageRec.completion_tokens], ['upstream_error', 'backend', 7, 3], JSON.stringify(usageRec));
  // The same line as part of an event left unfinished is no end marker.
  const inEvent = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': 'edge-done-in-event' }, body });
  await readAll(inEvent.res);
  assert.equal((await receiver.waitForClientId('edge-done-in-event', 15_000)).finish, 'upstream_error');
  // The three streams cut inside an event are upstream errors in the metrics too (the idle cut is
  // a timeout, the end marker without its blank line no error).
  const metrics = await scrapeMetrics(gw);
  assert.equal(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'cr', kind: 'stream_error' }), 3);
  assert.equal(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'cr', kind: 'timeout' }), 1);
});

test('an error event inside a 200 stream (vLLM, TGI, llama.cpp, named `error`): relayed as sent, and the record says "upstream_error" with the tokens that streamed', { timeout: 30_000 }, async () => {
  const be = await startBackend('inband');
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'ib' })], usage: { tokenize: false } });
  const tok = (t) => `data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"${t}"},"finish_reason":null}]}\n\n`;
  const streams = {
    'inband-vllm': `${tok('one ')}${tok('two ')}data: {"error":{"message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}\n\ndata: [DONE]\n\n`,
    'inband-vllm-old': `${tok('one ')}data: {"object":"error","message":"engine dead","type":"InternalServerError","param":null,"code":500}\n\ndata: [DONE]\n\n`,
    'inband-tgi': `${tok('one ')}${tok('two ')}data: {"error":"Request failed during generation: Server error: CUDA OOM","error_type":"generation"}\n\n`,
    'inband-named': `${tok('one ')}event: error\ndata: {"message":"overloaded"}\n\n`,
    // llama.cpp's server: an `error:` field (which SSE clients ignore), then [DONE].
    'inband-llamacpp': `${tok('one ')}error: {"code":500,"message":"Input prompt is too big compared to KV size.","type":"server_error"}\n\ndata: [DONE]\n\n`,
    // Generated text that talks about errors is no error.
    'inband-none': `${tok('an \\"error\\": ')}${tok('error')}data: [DONE]\n\n`,
  };
  be.handler = async (req, res) => {
    const id = req.headers['x-request-id'];
    if (id === 'inband-400' || id === 'inband-503-cut') {
      // Errors with a status of their own, sent as events: a 5xx is counted once (as 5xx), a 4xx
      // (TGI's validation errors) is the client's.
      res.writeHead(id === 'inband-400' ? 400 : 503, { 'content-type': 'text/event-stream' });
      res.end(id === 'inband-400' ? 'data: {"error":"Input validation error: too long","error_type":"validation"}\n\n' : 'data: {"error":"overlo');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.end(streams[id.replace(/-asked$/, '')]);
  };
  // The client asked for usage (relayed as is), or the gateway did (its usage chunk filtered out).
  for (const asked of [true, false]) {
    for (const [name, sent] of Object.entries(streams)) {
      const id = asked ? `${name}-asked` : name;
      const body = chatBody('m1', { stream: true, ...(asked ? { stream_options: { include_usage: true } } : {}) });
      const res = await postJson(gw.url, '/v1/chat/completions', body, { headers: { 'x-request-id': id } });
      assert.equal(res.status, 200);
      assert.equal(res.text(), sent, `${id}: relayed as the backend sent it`);
      const rec = await receiver.waitForClientId(id, 15_000);
      assert.equal(rec.finish, name === 'inband-none' ? 'completed' : 'upstream_error', `${id}: ${JSON.stringify(rec)}`);
      assert.equal(rec.status_code, 200);
      assert.equal(rec.usage_source, 'estimated');
      assert.ok(rec.completion_tokens > 0, `${id}: the tokens that streamed are billed`);
    }
  }
  for (const [id, status] of [['inband-400', 400], ['inband-503-cut', 503]]) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-request-id': id } });
    assert.equal(res.status, status);
    assert.equal((await receiver.waitForClientId(id, 15_000)).status_code, status);
  }
  // Each 200 stream that reported an error counts as an upstream error of its backend; the 503
  // once, as a 5xx; the 400 not at all.
  const metrics = await scrapeMetrics(gw);
  assert.equal(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'ib', kind: 'stream_error' }), 10);
  assert.equal(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'ib', kind: '5xx' }), 1);
  assert.equal(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'ib' }), 11);
});

test('a stream that fails or goes silent before its first content bills nothing (no /tokenize); a long silent prefill is bounded by first_byte, not stream_idle', { timeout: 60_000 }, async () => {
  const be = await startBackend('prefill');
  const gw = await startUsageGateway({
    mock,
    receiver,
    backends: [backendEntry(be, { name: 'pf' })],
    timeouts: { stream_idle: '400ms', first_byte: '2500ms' },
  });
  const tok = (t) => `data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"${t}"},"finish_reason":null}]}\n\n`;
  const usage = 'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n';
  const tokenizeCalls = [];
  be.handler = async (req, res) => {
    if (req.url === '/tokenize') {
      tokenizeCalls.push(req.headers['x-request-id']);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"count":1234}');
      return;
    }
    const id = req.headers['x-request-id'];
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.flushHeaders();
    if (id === 'pf-tgi') {
      // TGI rejects a prompt inside its 200 stream.
      res.end('data: {"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096","error_type":"validation"}\n\n');
    } else if (id === 'pf-reset') {
      setImmediate(() => req.socket.resetAndDestroy()); // a crash during prefill
    } else if (id === 'pf-slow') {
      // A prefill three times stream_idle long, under first_byte: the stream goes through.
      await new Promise((r) => setTimeout(r, 1200));
      res.end(`${tok('one ')}${tok('two')}${usage}data: [DONE]\n\n`);
    } // pf-silent: nothing more, ever
  };
  const body = chatBody('m1', { stream: true });
  const cases = [
    ['pf-tgi', 'upstream_error'],
    ['pf-reset', 'upstream_error'],
    ['pf-silent', 'timeout'],
  ];
  for (const [id, finish] of cases) {
    const s = await openStream(`${gw.url}/v1/chat/completions`, { headers: { 'content-type': 'application/json', 'x-request-id': id }, body: JSON.stringify(body) });
    assert.equal(s.res.statusCode, 200, id);
    const text = await new Promise((resolve) => {
      let t = '';
      s.res.on('data', (d) => (t += d));
      s.res.on('error', () => {});
      s.res.on('close', () => resolve(t));
    });
    if (id === 'pf-silent') assert.match(text, /nothing within timeouts\.first_byte.*"code":"upstream_timeout"/, text);
    const rec = await receiver.waitForClientId(id, 15_000);
    assert.deepEqual([rec.finish, rec.prompt_tokens, rec.completion_tokens, rec.total_tokens], [finish, 0, 0, 0], `${id}: ${JSON.stringify(rec)}`);
  }
  const slow = await postJson(gw.url, '/v1/chat/completions', body, { headers: { 'x-request-id': 'pf-slow' } });
  assert.equal(slow.status, 200);
  assert.equal(slow.text(), `${tok('one ')}${tok('two')}data: [DONE]\n\n`, 'the slow stream whole, without the usage chunk the gateway asked for');
  const rec = await receiver.waitForClientId('pf-slow', 15_000);
  assert.deepEqual([rec.finish, rec.usage_source, rec.prompt_tokens, rec.completion_tokens], ['completed', 'backend', 9, 2], JSON.stringify(rec));
  assert.deepEqual(tokenizeCalls, [], 'no prompt is counted for a stream the backend failed');
});

test('a client that hangs up right after [DONE], before the backend has ended its message, read a complete stream: "completed"', { timeout: 30_000 }, async () => {
  const be = await startBackend('donelate');
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'dl' })], usage: { tokenize: false } });
  const tok = (t) => `data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"${t}"},"finish_reason":null}]}\n\n`;
  const usage = 'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n';
  let ended;
  const backendDone = new Promise((r) => (ended = r));
  be.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write(`${tok('one ')}${tok('two')}${usage}data: [DONE]\n\n`);
    // The end of the chunked message comes late (a server finishing its bookkeeping).
    req.socket.once('close', () => ended('closed'));
    setTimeout(() => {
      res.end();
      ended('ended');
    }, 2000);
  };
  const s = await openStream(`${gw.url}/v1/chat/completions`, {
    headers: { 'content-type': 'application/json', 'x-request-id': 'done-late' },
    body: JSON.stringify(chatBody('m1', { stream: true })),
  });
  let text = '';
  await withTimeout(
    new Promise((resolve) => {
      s.res.on('data', (d) => {
        text += d;
        if (text.includes('data: [DONE]\n\n')) resolve();
      });
    }),
    10_000,
    'the end marker',
  );
  s.socket.destroy();
  // The gateway notices the hang-up and closes the upstream before the message's end.
  assert.equal(await backendDone, 'closed');
  const rec = await receiver.waitForClientId('done-late', 15_000);
  assert.deepEqual([rec.finish, rec.usage_source, rec.prompt_tokens, rec.completion_tokens], ['completed', 'backend', 9, 2], JSON.stringify(rec));
});

test('a /tokenize count past 2^53 is no answer: the prompt is estimated, the total stays a sum', { timeout: 30_000 }, async () => {
  const be = await startBackend('hugecount');
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'hc' })] });
  be.handler = async (req, res) => {
    if (req.url === '/tokenize') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"count":9223372036854775807}');
      return;
    }
    const body = '{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}]}';
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  };
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'huge-count' } });
  assert.equal(res.status, 200);
  const rec = await receiver.waitForClientId('huge-count', 15_000);
  assert.equal(rec.usage_source, 'estimated');
  assert.ok(rec.prompt_tokens > 0 && rec.prompt_tokens < 100, `the local estimate: ${rec.prompt_tokens}`);
  assert.equal(rec.total_tokens, rec.prompt_tokens + rec.completion_tokens);
  assert.equal(be.requests.filter((r) => r.url === '/tokenize').length, 1, 'the backend was asked');
});

test('a record\'s timestamp is when its request began, also when a slow /tokenize counted its prompt', { timeout: 30_000 }, async () => {
  const be = await startBackend('slowtok');
  be.handler = async (req, res) => {
    if (req.url === '/tokenize') {
      await new Promise((resolve) => setTimeout(resolve, 2500)); // the backend's own slowness
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"count":5}');
      return;
    }
    // An answer without usage: the prompt is counted by /tokenize, after the response.
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(chatAnswer('hi there'));
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(be, { name: 'st' })], health_check: { timeout: '5s' } });
  const t0 = Date.now();
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'edge-ts' } });
  const t1 = Date.now();
  assert.equal(res.status, 200);
  const rec = await receiver.waitForClientId('edge-ts', 15_000);
  assert.equal(rec.prompt_tokens, 5, JSON.stringify(rec));
  assert.equal(rec.usage_source, 'estimated');
  // Second precision: the second the request began, not 2.5 s later.
  const ts = Date.parse(rec.timestamp);
  assert.ok(ts >= Math.floor(t0 / 1000) * 1000 && ts <= t1, `timestamp ${rec.timestamp}, request from ${new Date(t0).toISOString()} to ${new Date(t1).toISOString()}`);
});

test('ttft_ms is the first data event: not a keep-alive comment before it, and null for a stream answered with an error', { timeout: 30_000 }, async () => {
  const backend = await startBackend('ping');
  const release = deferred();
  const events = [
    { id: 'p', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { role: 'assistant', content: 'hi' }, finish_reason: null }] },
    { id: 'p', object: 'chat.completion.chunk', choices: [{ index: 0, delta: {}, finish_reason: 'stop' }], usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 } },
  ];
  backend.handler = async (req, res) => {
    if (req.headers['x-answer'] === '429') {
      res.writeHead(429, { 'content-type': 'application/json' });
      return res.end('{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}');
    }
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write(': ping\n\n');
    if (req.headers['x-answer'] === 'content-then-error') {
      // Both in one write: the token reached the client, whatever came with it.
      return res.end(`data: ${JSON.stringify(events[0])}\n\ndata: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n`);
    }
    if (req.headers['x-answer'] === 'error-first') {
      return res.end('data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\ndata: [DONE]\n\n');
    }
    await release.promise;
    res.end(events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('') + 'data: [DONE]\n\n');
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'ping' })] });
  const stream = await openStream(`${gw.url}/v1/chat/completions`, {
    headers: { 'content-type': 'application/json', 'x-request-id': 'edge-ttft-ping' },
    body: JSON.stringify(chatBody('m1', { stream: true })),
  });
  let text = '';
  const pinged = deferred();
  stream.res.on('data', (d) => {
    text += d;
    if (text.includes(': ping')) pinged.resolve(performance.now());
  });
  const ended = new Promise((resolve) => stream.res.on('end', resolve));
  const pingSeen = await pinged.promise;
  // The gap the record must show at least: the gateway's request began before the ping reached
  // the client, and the first event left the backend after the release.
  await delay(200);
  const gap = performance.now() - pingSeen;
  release.resolve();
  await ended;
  assert.deepEqual(sseData(text), [...events.map((e) => JSON.stringify(e)), '[DONE]']);
  const rec = await receiver.waitForClientId('edge-ttft-ping', 10_000);
  assert.ok(rec.ttft_ms >= gap - 1, `ttft_ms ${rec.ttft_ms} counted the ping, not the first event ${gap} ms after it`);
  assert.ok(rec.ttft_ms <= rec.duration_ms, JSON.stringify(rec));
  for (const answer of ['429', 'error-first']) {
    const id = `edge-ttft-${answer}`;
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-request-id': id, 'x-answer': answer } });
    assert.equal(res.status, answer === '429' ? 429 : 200);
    const r = await receiver.waitForClientId(id, 10_000);
    assert.equal(r.ttft_ms, null, `${answer}: ${JSON.stringify(r)}`);
  }
  const both = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-request-id': 'edge-ttft-both', 'x-answer': 'content-then-error' } });
  assert.equal(both.status, 200);
  const r = await receiver.waitForClientId('edge-ttft-both', 10_000);
  assert.equal(typeof r.ttft_ms, 'number', JSON.stringify(r));
  assert.equal(r.finish, 'upstream_error');
});

test('a non-stream answer\'s copy for usage is held under server.max_body_memory; past it the copy keeps its windows and usage is still read', { timeout: 60_000 }, async () => {
  const backend = await startBackend('copy-mem');
  const usage = { prompt_tokens: 31, completion_tokens: 4, total_tokens: 35 };
  const whole = Buffer.from(chatAnswer('y'.repeat(600_000), usage));
  let release = deferred();
  backend.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': whole.length });
    res.write(whole.subarray(0, 500_000));
    await release.promise;
    res.end(whole.subarray(500_000));
  };
  const run = async (gw, id) => {
    release = deferred();
    const stream = await openStream(`${gw.url}/v1/chat/completions`, {
      headers: { 'content-type': 'application/json', 'x-request-id': id },
      body: JSON.stringify(chatBody('m1')),
    });
    let got = 0;
    const halfway = deferred();
    stream.res.on('data', (d) => {
      got += d.length;
      if (got >= 500_000) halfway.resolve();
    });
    const ended = new Promise((resolve) => stream.res.on('end', resolve));
    await halfway.promise;
    // The gateway wrote the first 500 KB to the client after copying it.
    const held = metricSum(await scrapeMetrics(gw), 'llmproxy_request_body_bytes');
    release.resolve();
    await ended;
    assert.equal(got, whole.length);
    const rec = await receiver.waitForClientId(id, 10_000);
    assert.equal(rec.usage_source, 'backend', JSON.stringify(rec));
    assert.equal(rec.prompt_tokens, usage.prompt_tokens);
    assert.equal(rec.completion_tokens, usage.completion_tokens);
    await waitUntil(async () => metricSum(await scrapeMetrics(gw), 'llmproxy_request_body_bytes') === 0, { what: 'the copy given back' });
    return held;
  };
  const roomy = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'cm' })] });
  const heldRoomy = await run(roomy, 'edge-copy-roomy');
  assert.ok(heldRoomy >= 500_000, `the copy of 500 KB in flight was not counted: ${heldRoomy}`);
  const tight = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'cm' })], server: { max_body_size: '64KiB', max_body_memory: '128KiB' } });
  const heldTight = await run(tight, 'edge-copy-tight');
  assert.ok(heldTight <= 128 * 1024 + 64, `held ${heldTight} bytes past max_body_memory`);
});

test('a /tokenize answer is read up to 8 bytes a byte of its question plus 64 KiB; a larger one counts nothing and the prompt is estimated', { timeout: 30_000 }, async () => {
  const backend = await startBackend('tok-big');
  backend.handler = async (req, res, body) => {
    if (req.url === '/tokenize') {
      const pad = body.toString().includes('pad-me') ? 'x'.repeat(200_000) : '';
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ count: 777, max_model_len: 4096, pad }));
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(chatAnswer('hello there'));
  };
  const gw = await startUsageGateway({ mock, receiver, backends: [backendEntry(backend, { name: 'tb' })] });
  const ask = async (id, content) => {
    const res = await postJson(gw.url, '/v1/chat/completions', { model: 'm1', messages: [{ role: 'user', content }] }, { headers: { 'x-request-id': id } });
    assert.equal(res.status, 200);
    return receiver.waitForClientId(id, 10_000);
  };
  const small = await ask('edge-tok-small', 'count me');
  assert.equal(small.prompt_tokens, 777, JSON.stringify(small));
  const big = await ask('edge-tok-big', 'pad-me');
  assert.equal(big.usage_source, 'estimated');
  assert.notEqual(big.prompt_tokens, 777, `a 200 KB answer to a question of ${'pad-me'.length} bytes was read: ${JSON.stringify(big)}`);
  assert.ok(big.prompt_tokens > 0 && big.prompt_tokens < 50, JSON.stringify(big));
});
