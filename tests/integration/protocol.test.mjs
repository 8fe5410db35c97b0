// HTTP framing corner cases where a proxy can desynchronise or truncate: interim 1xx responses
// from the backend, HTTP/1.0 clients, and request bodies of undefined length.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startBackend,
  startGateway,
  backendEntry,
  postJson,
  rawExchange,
  rawRequest,
  openAIError,
} from './lib/harness.mjs';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

test('interim 103 Early Hints are not taken for the response, and the pooled connection stays in sync', async () => {
  const backend = await startBackend('hints');
  backend.handler = async (req, res, body) => {
    const marker = JSON.parse(body.toString()).marker;
    res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' });
    const json = JSON.stringify({ marker });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
    res.end(json);
  };
  const gw = await startGateway({ server: { workers: 1 }, backends: [backendEntry(backend, { name: 'hints' })] });
  for (let i = 0; i < 6; i++) {
    const res = await postJson(gw.url, '/v1/chat/completions', { model: 'm1', messages: [], marker: `m${i}` });
    assert.equal(res.status, 200, res.text());
    assert.deepEqual(JSON.parse(res.text()), { marker: `m${i}` }, `request ${i} got another request's answer`);
  }
  // All six went over pooled connections: reuse is what the desync would have broken.
  assert.ok(backend.connectionsAccepted <= 2, `${backend.connectionsAccepted} upstream connections`);
});

test('an HTTP/1.0 client gets a stream without chunked framing, ended by the connection close', async () => {
  const backend = await startBackend('sse10');
  const sse = 'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n';
  backend.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write(sse.slice(0, 20));
    res.end(sse.slice(20));
  };
  const gw = await startGateway({ backends: [backendEntry(backend, { name: 'sse10' })] });
  const body = JSON.stringify({ model: 'm1', stream: true, messages: [] });
  const head = `POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n`;
  const res = await rawExchange(gw.port, Buffer.concat([Buffer.from(head), Buffer.from(body)]));
  assert.equal(res.status, 200);
  assert.equal(res.headers['transfer-encoding'], undefined, 'HTTP/1.0 clients cannot decode chunks');
  assert.equal(res.body.toString(), sse);
});

test('a request whose Transfer-Encoding does not end in chunked is refused, never forwarded', async () => {
  const backend = await startBackend('te');
  const gw = await startGateway({ backends: [backendEntry(backend, { name: 'te' })] });
  const smuggled = 'GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n';
  const bytes = rawRequest('POST', '/v1/chat/completions', [
    ['Host', 'x'],
    ['Content-Type', 'application/json'],
    ['Transfer-Encoding', 'chunked, identity'],
  ], smuggled);
  const res = await rawExchange(gw.port, bytes);
  assert.equal(res.status, 400);
  assert.equal(openAIError(res).type, 'invalid_request_error');
  assert.equal(res.headers.connection?.[0], 'close');
  assert.equal(backend.apiRequests.length, 0);
});
