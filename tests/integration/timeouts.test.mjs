// The gateway's I/O deadlines (timeouts.*): each one cuts exactly the wait it is for, and none
// cuts a request that keeps making progress. They are checked by a per-worker sweep rather than
// a timer per operation, so these tests pin down what the sweep must still do.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  startGateway,
  backendEntry,
  connect,
  chatBody,
  openStream,
  readAll,
  sseData,
  rawExchange,
  jsonPostBytes,
  mockPathCount,
  withTimeout,
  startBackend,
  waitUntil,
  httpRequest,
  postJson,
} from './lib/harness.mjs';
import { scrapeMetrics, metricSum } from './lib/usage.mjs';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// Everything the gateway sends on `socket` until it closes the connection.
function untilClosed(socket, what) {
  return withTimeout(
    new Promise((resolve) => {
      const chunks = [];
      socket.on('data', (d) => chunks.push(d));
      socket.on('error', () => {});
      socket.once('close', () => resolve(Buffer.concat(chunks).toString('latin1')));
    }),
    10_000,
    what,
  );
}

async function gatewayWith(timeouts) {
  const mock = await startMock({ name: 'mock' });
  const gw = await startGateway({ server: { workers: 1 }, timeouts, backends: [backendEntry(mock, { name: 'mock' })] });
  return { mock, gw };
}

test('a keep-alive connection idle past timeouts.keepalive is closed after its response', { timeout: 20_000 }, async () => {
  const { gw } = await gatewayWith({ keepalive: '300ms' });
  const socket = await connect(gw.port);
  const closed = untilClosed(socket, 'the gateway closing an idle keep-alive connection');
  socket.write(jsonPostBytes(gw.port, '/v1/chat/completions', chatBody('m1')));
  const seen = await closed;
  assert.match(seen, /^HTTP\/1\.1 200 /, 'the response came first');
  assert.doesNotMatch(seen, /connection: close/i, 'kept alive until the idle timeout, not closed with the response');
});

test('a request header that stalls past timeouts.client_header is dropped and never forwarded', { timeout: 20_000 }, async () => {
  const { mock, gw } = await gatewayWith({ client_header: '300ms' });
  const socket = await connect(gw.port);
  const closed = untilClosed(socket, 'the gateway dropping a stalled header');
  socket.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n');
  assert.equal(await closed, '', 'no response to half a header');
  assert.equal(await mockPathCount(mock, '/v1/chat/completions'), 0);
});

test('a request body that stalls past timeouts.client_header is dropped and never forwarded', { timeout: 20_000 }, async () => {
  const { mock, gw } = await gatewayWith({ client_header: '300ms' });
  const socket = await connect(gw.port);
  const closed = untilClosed(socket, 'the gateway dropping a stalled body');
  socket.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":');
  await closed;
  assert.equal(await mockPathCount(mock, '/v1/chat/completions'), 0);
});

test('a stream longer than timeouts.stream_idle in total, with shorter gaps, is not cut', { timeout: 20_000 }, async () => {
  // 25 events 100 ms apart: about 2.5 x both timeouts in total, while each gap stays 10 x shorter
  // than them (the deadlines are swept every 100 ms; a loaded sanitizer run must not cut a gap).
  const tokens = 25;
  const { gw } = await gatewayWith({ stream_idle: '1s', first_byte: '1s' });
  const { res } = await openStream(`${gw.url}/v1/chat/completions`, {
    body: JSON.stringify(chatBody('m1', { stream: true })),
    headers: { 'content-type': 'application/json', 'x-mock-tokens': String(tokens), 'x-mock-delay-ms': '100' },
  });
  assert.equal(res.statusCode, 200);
  const data = sseData((await readAll(res)).toString());
  assert.equal(data.at(-1), '[DONE]');
  const deltas = data.filter((d) => d !== '[DONE]' && JSON.parse(d).choices?.[0]?.delta?.content !== undefined);
  assert.equal(deltas.length, tokens);
});

test('a backend silent mid-stream past timeouts.stream_idle: the client sees a truncated message', { timeout: 20_000 }, async () => {
  const { gw } = await gatewayWith({ stream_idle: '300ms' });
  const body = JSON.stringify(chatBody('m1', { stream: true }));
  const request = Buffer.from(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Mock-Tokens: 3\r\n` +
      `X-Mock-Delay-Ms: 2000\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
  // The header and the first event come at once, then 2 s of silence: the gateway must end the
  // connection without the last chunk, so the client cannot take the cut stream as complete.
  await assert.rejects(rawExchange(gw.port, request, { timeout: 10_000 }), /without a complete response/);
});

test('a client that stops reading a stream is cut at timeouts.stream_idle, and logged as a timeout, not a hang-up', { timeout: 60_000 }, async () => {
  const backend = await startBackend('stall');
  // More than loopback socket buffers hold (several MiB), sent as fast as the gateway takes it.
  const event = `data: ${JSON.stringify({ choices: [{ index: 0, delta: { content: 'x'.repeat(4000) } }] })}\n\n`;
  backend.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    for (let i = 0; i < 8000 && !res.destroyed; i++) {
      if (!res.write(event)) await new Promise((r) => { res.once('drain', r); res.once('close', r); });
    }
    res.end('data: [DONE]\n\n');
  };
  const gw = await startGateway({
    server: { access_log: true },
    timeouts: { stream_idle: '1s' },
    backends: [backendEntry(backend, { name: 'stall' })],
  });
  const body = JSON.stringify(chatBody('m1', { stream: true }));
  const socket = await connect(gw.port);
  socket.on('error', () => {});
  // Never read: no 'data' listener, the socket stays paused and the window fills.
  socket.write(`POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: stall-1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  await waitUntil(() => gw.stdout.includes('"client_request_id":"stall-1"') || /"stall-1"/.test(gw.stdout), { timeout: 30_000, what: 'the access log line of the stalled stream' });
  socket.destroy();
  const line = gw.stdout.split('\n').find((l) => l.includes('stall-1'));
  const entry = JSON.parse(line);
  assert.equal(entry.finish, 'timeout', line);
  assert.equal(entry.status, 200, 'the client got the header: its status stays');
  const metrics = (await httpRequest(`${gw.url}/metrics`)).text();
  assert.match(metrics, /^llmproxy_client_disconnects_total 0$/m);
});

test('a backend whose connect never completes is given up at timeouts.connect, counted as a timeout, and the request retried on another', { timeout: 30_000 }, async () => {
  const stuck = await startMock({ name: 'stuck', extraArgs: ['--no-accept'] });
  // Fill its accept queue (backlog 0 holds one or two): after that the kernel drops new SYNs,
  // so a connect hangs as to a host that stopped answering.
  const fillers = [];
  for (let i = 0; i < 8; i++) {
    const s = net.connect({ port: stuck.port, host: '127.0.0.1' });
    s.on('error', () => {});
    const connected = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), 500);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    fillers.push(s);
    if (!connected) break;
  }
  try {
    const live = await startMock({ name: 'live' });
    const gw = await startGateway({
      server: { workers: 1 },
      timeouts: { connect: '300ms' },
      load_balancing: { max_retries: 1 },
      health_check: { enabled: false },
      backends: [backendEntry(stuck, { name: 'stuck' }), backendEntry(live, { name: 'live' })],
    });
    for (let i = 0; i < 4; i++) {
      const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
      assert.equal(res.status, 200, res.text().slice(0, 300));
      assert.equal(res.headers['x-mock-backend'], 'live');
    }
    const metrics = await scrapeMetrics(gw);
    assert.ok(metricSum(metrics, 'llmproxy_upstream_errors_total', { backend: 'stuck', kind: 'timeout' }) >= 1, 'the connect timeout is counted for the stuck backend');
    assert.ok(metricSum(metrics, 'llmproxy_retries_total', {}) >= 1);
    // Without another backend to try: 502 naming the connect timeout, within bounded time.
    const alone = await startGateway({
      server: { workers: 1 },
      timeouts: { connect: '300ms' },
      load_balancing: { max_retries: 0 },
      health_check: { enabled: false },
      backends: [backendEntry(stuck, { name: 'stuck' })],
    });
    const res = await postJson(alone.url, '/v1/chat/completions', chatBody('m1'), { timeout: 10_000 });
    assert.equal(res.status, 502, res.text().slice(0, 300));
    assert.match(res.json().error.message, /stuck: .*(timed out|timeout)/i);
  } finally {
    for (const s of fillers) s.destroy();
  }
});
