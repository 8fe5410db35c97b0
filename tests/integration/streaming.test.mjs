// Zero buffering: the backend only sends the next piece once the client holds the previous one,
// so a proxy that buffers anything deadlocks and the test times out. Also: client hang-ups close
// the upstream connection at once, whatever state the upstream is in.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startBackend,
  startGateway,
  startMock,
  backendEntry,
  postJson,
  chatBody,
  openRawStream,
  jsonPostBytes,
  withTimeout,
  deferred,
  chatStreamContent,
  mockTokens,
} from './lib/harness.mjs';

let backend;
let gw;

before(async () => {
  backend = await startBackend('own');
  gw = await startGateway({ backends: [backendEntry(backend, { name: 'own' })] });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

function chunkEvent(k) {
  return `data: {"id":"chatcmpl-lock","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{"content":"t${k} "},"finish_reason":null}]}\n\n`;
}

// Sends `pieces` one at a time through the gateway; piece i+1 leaves the backend only after the
// client received every body byte up to the end of piece i. Returns the body the client received.
async function lockstep(pieces, { stepTimeout = 5_000, total = 30_000 } = {}) {
  let stream;
  const clientReady = deferred();
  backend.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.flushHeaders();
    const s = await clientReady.promise;
    let sent = 0;
    for (let i = 0; i < pieces.length; i++) {
      res.write(pieces[i]);
      sent += Buffer.byteLength(pieces[i]);
      const want = sent;
      await s.until((x) => x.body.length >= want, stepTimeout, `the client to receive piece ${i} (${want} body bytes): the gateway holds bytes back`);
    }
    res.end();
  };
  stream = await openRawStream(gw.port, jsonPostBytes(gw.port, '/v1/chat/completions', chatBody('m1', { stream: true })));
  clientReady.resolve(stream);
  try {
    await stream.until((x) => x.ended, total, 'the end of the lockstep stream');
  } finally {
    stream.destroy();
  }
  assert.equal(stream.head.status, 200);
  const expected = pieces.join('');
  assert.equal(stream.text, expected);
  return stream.text;
}

test('20 events in lockstep: each event reaches the client before the next is sent', { timeout: 60_000 }, async () => {
  const pieces = [];
  for (let k = 0; k < 20; k++) pieces.push(chunkEvent(k));
  pieces.push('data: [DONE]\n\n');
  const text = await lockstep(pieces);
  const { content, done } = chatStreamContent(text);
  assert.equal(content, Array.from({ length: 20 }, (_, k) => `t${k} `).join(''));
  assert.ok(done);
});

test('a comment-only keep-alive (": ping") passes through on its own', { timeout: 60_000 }, async () => {
  const pieces = [': ping\n\n', chunkEvent(0), ': ping\n\n', ':\n\n', chunkEvent(1), 'data: [DONE]\n\n'];
  const text = await lockstep(pieces);
  assert.equal((text.match(/^: ping$/gm) ?? []).length, 2);
});

test('partial events are forwarded without waiting for the rest of the event', { timeout: 60_000 }, async () => {
  const ev = chunkEvent(0);
  const pieces = [ev.slice(0, 4), ev.slice(4, 40), ev.slice(40, -1), ev.slice(-1), 'data: [DONE]\n', '\n'];
  await lockstep(pieces);
});

test('a mock stream of 50 tokens arrives whole and ends with [DONE]', { timeout: 30_000 }, async () => {
  const mock = await startMock({ name: 'mk' });
  const gw2 = await startGateway({ backends: [backendEntry(mock, { name: 'mk' })] });
  const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-mock-tokens': '50' } });
  assert.equal(res.status, 200);
  assert.equal(res.headers['x-accel-buffering'], 'no');
  const { content, done } = chatStreamContent(res.text());
  assert.equal(content, mockTokens(50));
  assert.ok(done, 'no [DONE]');
});

// ---- client hang-up ----

// Opens a client request; `backendState(res)` brings the backend into the state to test. Then the
// client hangs up (after `clientWaitsFor(stream)` holds, if given) and the backend must see its
// connection closed within a few seconds.
async function hangUpWhen(backendState, { stream = true, clientWaitsFor } = {}) {
  const ready = deferred();
  const held = deferred();
  backend.handler = async (req, res, body, record) => {
    await backendState(res);
    ready.resolve(record);
    // Hold the response open until the test ends it.
    await held.promise;
    if (!res.destroyed) res.end();
  };
  const client = await openRawStream(gw.port, jsonPostBytes(gw.port, '/v1/chat/completions', chatBody('m1', { stream })));
  try {
    const record = await withTimeout(ready.promise, 10_000, 'the backend to receive the request');
    if (clientWaitsFor) await client.until(clientWaitsFor, 10_000, 'the client to receive the first bytes');
    client.destroy();
    await withTimeout(record.socketClosed, 5_000, 'the gateway to close the upstream connection after the client hung up');
  } finally {
    held.resolve();
    client.destroy();
  }
  // The gateway still serves.
  backend.handler = null;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200);
}

test('client hang-up mid-stream closes the upstream connection', { timeout: 30_000 }, async () => {
  await hangUpWhen(
    async (res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(chunkEvent(0));
    },
    { clientWaitsFor: (c) => c.text.includes('"t0 "') },
  );
});

test('client hang-up after the upstream sent only headers closes the upstream connection', { timeout: 30_000 }, async () => {
  await hangUpWhen(async (res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.flushHeaders();
  });
});

test('client hang-up during a silent prefill (nothing sent yet) closes the upstream connection', { timeout: 30_000 }, async () => {
  await hangUpWhen(async () => {});
});

test('client hang-up while a non-stream request waits for its response closes the upstream connection', { timeout: 30_000 }, async () => {
  await hangUpWhen(async () => {}, { stream: false });
});
