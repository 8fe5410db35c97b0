// Request framing a client controls and the gateway must bound or refuse: chunk-size lines and
// trailer sections that never end, trailer fields posing as headers, a body trickled a byte at a
// time, transfer codings other than chunked alone, Host rules, and 100-continue for HTTP/1.0.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startBackend,
  startGateway,
  backendEntry,
  connect,
  rawExchange,
  openAIError,
  parseResponse,
  waitUntil,
  withTimeout,
  delay,
} from './lib/harness.mjs';

let backend;
let gw;

before(async () => {
  backend = await startBackend('fr');
  gw = await startGateway({
    server: { max_header_size: '4KiB', access_log: true },
    timeouts: { client_header: '1s' },
    backends: [backendEntry(backend, { name: 'fr' })],
  });
});
beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

const BODY = '{"model":"m1","messages":[]}';

function head(lines, version = '1.1') {
  return Buffer.from(`POST /v1/chat/completions HTTP/${version}\r\n${lines.map((l) => l + '\r\n').join('')}\r\n`, 'latin1');
}

function assertRefused(res, what) {
  assert.equal(res.status, 400, `${what}: status ${res.status} ${res.body.toString().slice(0, 200)}`);
  assert.equal(openAIError(res).code, 'invalid_request', what);
  assert.equal(res.headers.connection?.[0]?.toLowerCase(), 'close', `${what}: the connection is closed after the answer`);
}

test('a chunk-size line, chunk extension or trailer section that never ends gets 400 past max_header_size', { timeout: 60_000 }, async () => {
  const endless = Buffer.alloc(1024 * 1024, 'a');
  const zeros = Buffer.alloc(1024 * 1024, '0');
  const cases = [
    ['a chunk extension', Buffer.concat([Buffer.from('5;'), endless])],
    ['a trailer field', Buffer.concat([Buffer.from('0\r\nX-T: '), endless])],
    ['a chunk-size line', zeros],
  ];
  const seen = backend.apiRequests.length;
  for (const [what, body] of cases) {
    const bytes = Buffer.concat([head(['Host: x', 'Content-Type: application/json', 'Transfer-Encoding: chunked']), body]);
    const res = await rawExchange(gw.port, bytes);
    assertRefused(res, what);
    assert.match(openAIError(res).message, /longer than server\.max_header_size/, what);
  }
  assert.equal(backend.apiRequests.length, seen, 'nothing reached the backend');
});

test('a request line past max_header_size gets 414, header fields past it 431, both closed', { timeout: 30_000 }, async () => {
  const pad = 'a'.repeat(5000);
  const seen = backend.apiRequests.length;
  const cases = [
    ['a long target', Buffer.from(`GET /v1/models?q=${pad} HTTP/1.1\r\nHost: x\r\n\r\n`, 'latin1'), 414, 'uri_too_long', /request line is longer/],
    ['a long field', head(['Host: x', `X-Pad: ${pad}`, 'Content-Length: 0']), 431, 'headers_too_large', /headers are larger/],
    ['many short fields', head(['Host: x', ...Array.from({ length: 10_000 }, (_, i) => `X-F${i}: 0123456789`)]), 431, 'headers_too_large', /headers are larger/],
  ];
  for (const [what, bytes, status, code, message] of cases) {
    const res = await rawExchange(gw.port, bytes);
    assert.equal(res.status, status, `${what}: ${res.body.toString().slice(0, 200)}`);
    assert.equal(openAIError(res).code, code, what);
    assert.match(openAIError(res).message, message, what);
    assert.equal(res.headers.connection?.[0]?.toLowerCase(), 'close', what);
  }
  // A short request line that arrives apart from its (too long) fields is still no long target.
  const socket = await connect(gw.port);
  socket.setNoDelay(true);
  let answer = Buffer.alloc(0);
  socket.on('data', (d) => { answer = Buffer.concat([answer, d]); });
  const closed = new Promise((resolve) => socket.on('close', resolve));
  socket.write('GET /v1/mo');
  await delay(50); // only to make a split likely: coalesced, the bytes must get the same answer
  socket.write(`dels HTTP/1.1\r\nHost: x\r\nX-Pad: ${pad}\r\n\r\n`);
  await withTimeout(closed, 10_000, 'the answer to a split request line');
  const split = parseResponse(answer, true);
  assert.equal(split.status, 431, answer.toString().slice(0, 300));
  assert.equal(backend.apiRequests.length, seen, 'nothing reached the backend');
});

test('trailer fields are dropped, not forwarded as headers or read as the caller', { timeout: 30_000 }, async () => {
  const hexLen = Buffer.byteLength(BODY).toString(16);
  const bytes = Buffer.concat([
    head(['Host: x', 'Content-Type: application/json', 'Transfer-Encoding: chunked', 'Connection: close']),
    Buffer.from(`${hexLen}\r\n${BODY}\r\n0\r\nAuthorization: Bearer sk-smuggled\r\nX-User-Id: mallory\r\nX-Forwarded-For: 6.6.6.6\r\nX-Trailer: t\r\n\r\n`, 'latin1'),
  ]);
  const res = await rawExchange(gw.port, bytes);
  assert.equal(res.status, 200, res.body.toString().slice(0, 200));
  const got = backend.apiRequests.at(-1);
  assert.equal(got.body.toString(), BODY);
  assert.equal(got.headers.authorization, undefined, 'a trailer became Authorization');
  assert.equal(got.headers['x-user-id'], undefined, 'a trailer became X-User-Id');
  assert.equal(got.headers['x-trailer'], undefined);
  assert.equal(got.headers['x-forwarded-for'], '127.0.0.1');
});

test('timeouts.client_header bounds the body as a whole: a body trickled byte by byte is cut', { timeout: 30_000 }, async () => {
  // 1 byte every 100 ms: each read comes well within the 1 s deadline, the whole body does not.
  const socket = await connect(gw.port);
  const seen = backend.apiRequests.length;
  let received = Buffer.alloc(0);
  socket.on('data', (d) => (received = Buffer.concat([received, d])));
  const closed = new Promise((resolve) => socket.once('close', resolve));
  socket.write(head(['Host: x', 'Content-Type: application/json', `Content-Length: ${BODY.length}`]));
  let sent = 0;
  let isClosed = false;
  closed.then(() => (isClosed = true));
  while (sent < BODY.length && !isClosed && !socket.destroyed) {
    await new Promise((r) => setTimeout(r, 100));
    if (isClosed) break;
    socket.write(BODY[sent++]);
  }
  if (!isClosed) socket.destroy();  // the whole body went out: the assertion below fails
  await closed;
  assert.ok(sent < BODY.length, `the gateway waited for all ${BODY.length} trickled bytes`);
  assert.equal(parseResponse(received, true)?.status ?? null, null, `answered: ${received.toString().slice(0, 100)}`);
  assert.equal(backend.apiRequests.length, seen, 'the partial request reached the backend');
  // The access log says the gateway's deadline cut it (408, timeout), with the bytes that came.
  let line;
  await waitUntil(() => (line = gw.stdout.split('\n').find((l) => l.includes('"status":408'))) !== undefined, {
    timeout: 5_000,
    what: 'the access log line of the cut request',
  });
  const entry = JSON.parse(line);
  assert.equal(entry.finish, 'timeout');
  assert.ok(entry.bytes_in > 0 && entry.bytes_in < BODY.length, line);
});

test('a client that leaves in the middle of its header gets no answer and is not counted as a 400', { timeout: 30_000 }, async () => {
  const s = await connect(gw.port);
  let got = '';
  s.on('data', (d) => (got += d.toString('latin1')));
  const closed = new Promise((resolve) => s.once('close', resolve));
  s.end('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty'); // then its FIN
  await withTimeout(closed, 10_000, 'the gateway to close the connection');
  assert.equal(got, '', 'an answer was written to a client that had left');
});

test('timeouts.client_header cuts a new connection that sends nothing, and a header trickled without end, which is logged as 408', { timeout: 30_000 }, async () => {
  // keepalive is 30 s here: a silent new connection is closed at client_header (1 s), well
  // before that (bounded wait: 15 s).
  const silent = await connect(gw.port);
  const silentClosed = new Promise((resolve) => silent.once('close', resolve));
  silent.on('error', () => {});
  const raced = await Promise.race([silentClosed.then(() => 'closed'), new Promise((r) => setTimeout(() => r('open'), 15_000))]);
  assert.equal(raced, 'closed', 'a connection that never sent a byte was held past client_header');
  // A header that never ends: cut at client_header, no answer, and counted.
  const before = gw.stdout.split('\n').filter((l) => l.includes('"status":408') && l.includes('"path":"-"')).length;
  const socket = await connect(gw.port);
  let received = Buffer.alloc(0);
  socket.on('data', (d) => (received = Buffer.concat([received, d])));
  socket.on('error', () => {});
  const closed = new Promise((resolve) => socket.once('close', resolve));
  socket.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n');
  await closed;
  assert.equal(received.length, 0, `answered: ${received.toString().slice(0, 100)}`);
  await waitUntil(() => gw.stdout.split('\n').filter((l) => l.includes('"status":408') && l.includes('"path":"-"')).length > before, {
    timeout: 5_000,
    what: 'the access log line of the cut header',
  });
  const line = gw.stdout.split('\n').filter((l) => l.includes('"status":408') && l.includes('"path":"-"')).at(-1);
  assert.equal(JSON.parse(line).finish, 'timeout', line);
});

test('refused framing: a coding besides chunked, Transfer-Encoding in HTTP/1.0, no or two Host headers', { timeout: 30_000 }, async () => {
  const hexLen = Buffer.byteLength(BODY).toString(16);
  const chunked = Buffer.from(`${hexLen}\r\n${BODY}\r\n0\r\n\r\n`);
  const plain = Buffer.from(BODY);
  const seen = backend.apiRequests.length;
  const cases = [
    ['gzip, chunked', head(['Host: x', 'Transfer-Encoding: gzip, chunked']), chunked],
    ['chunked, chunked', head(['Host: x', 'Transfer-Encoding: chunked, chunked']), chunked],
    ['HTTP/1.0 with Transfer-Encoding', head(['Host: x', 'Connection: keep-alive', 'Transfer-Encoding: chunked'], '1.0'), chunked],
    ['HTTP/1.1 without Host', head([`Content-Length: ${plain.length}`]), plain],
    ['HTTP/1.1 with two Host headers', head(['Host: a', 'Host: b', `Content-Length: ${plain.length}`]), plain],
  ];
  for (const [what, h, body] of cases) {
    // A second request right behind: it must not be read from the refused one's connection.
    const next = Buffer.from('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
    const res = await rawExchange(gw.port, Buffer.concat([h, body, next]));
    assertRefused(res, what);
  }
  assert.equal(backend.apiRequests.length, seen, 'a refused request reached the backend');
  // HTTP/1.0 needs no Host.
  const ok = await rawExchange(gw.port, Buffer.concat([head([`Content-Length: ${plain.length}`], '1.0'), plain]));
  assert.equal(ok.status, 200, ok.body.toString().slice(0, 200));
});

test('an HTTP/1.0 client sending Expect: 100-continue gets no interim 100 answer', { timeout: 30_000 }, async () => {
  const socket = await connect(gw.port);
  let received = Buffer.alloc(0);
  const firstBytes = new Promise((resolve) => socket.on('data', (d) => {
    received = Buffer.concat([received, d]);
    resolve();
  }));
  const closed = new Promise((resolve) => socket.once('close', resolve));
  socket.write(head(['Host: x', 'Expect: 100-continue', `Content-Length: ${BODY.length}`], '1.0'));
  // A 1.1 client would get "100 Continue" at once; within 300 ms nothing may come for 1.0 (a
  // bound for a negative check, not a synchronisation).
  const early = await Promise.race([firstBytes.then(() => true), new Promise((r) => setTimeout(() => r(false), 300))]);
  assert.equal(early, false, `answered before the body: ${received.toString().slice(0, 60)}`);
  socket.write(BODY);
  await closed;
  const res = parseResponse(received, true);
  assert.equal(res?.status, 200, received.toString().slice(0, 200));
  assert.ok(received.toString('latin1').startsWith('HTTP/1.1 200 '), received.toString().slice(0, 60));
});

test('an expectation other than 100-continue is answered 417 before the body; 100-continue in any case and in a list gets its 100', { timeout: 30_000 }, async () => {
  const seen = backend.apiRequests.length;
  for (const expect of ['100-continue, foo', 'FOO', '100-continue']) {
    // Only the header: a client that expects something waits for the answer before its body.
    const lines = ['Host: x', 'Content-Type: application/json', `Content-Length: ${BODY.length}`, `Expect: ${expect}`];
    if (expect === '100-continue') lines.push('Expect: foo');  // a second field is the same list
    const res = await rawExchange(gw.port, head(lines));
    assert.equal(res.status, 417, `Expect: ${expect}: ${res.status} ${res.body.toString().slice(0, 200)}`);
    const e = openAIError(res);
    assert.equal(e.code, 'expectation_failed');
    assert.match(e.message, /"foo"/i);
    assert.equal(res.headers.connection?.[0]?.toLowerCase(), 'close');
  }
  assert.equal(backend.apiRequests.length, seen, 'nothing reached the backend');
  for (const expect of ['100-Continue', ' 100-continue ,', '100-continue, 100-continue']) {
    const socket = await connect(gw.port);
    let received = Buffer.alloc(0);
    const arrived = new EventEmitter();
    socket.on('data', (d) => {
      received = Buffer.concat([received, d]);
      arrived.emit('data');
    });
    const got = (pattern) =>
      withTimeout(
        new Promise((resolve) => {
          const check = () => {
            if (!pattern.test(received.toString('latin1'))) return;
            arrived.off('data', check);
            resolve();
          };
          arrived.on('data', check);
          check();
        }),
        10_000,
        `${pattern} for Expect: ${expect}`,
      );
    socket.write(head(['Host: x', 'Content-Type: application/json', `Expect: ${expect}`, `Content-Length: ${BODY.length}`, 'Connection: close']));
    await got(/^HTTP\/1\.1 100 Continue\r\n\r\n/);
    socket.write(BODY);
    await got(/HTTP\/1\.1 200 /);
    socket.destroy();
  }
});

test('an absolute-form request target is routed and forwarded by its path', { timeout: 30_000 }, async () => {
  const body = Buffer.from(BODY);
  const bytes = Buffer.concat([
    Buffer.from(`POST http://gateway.example/v1/chat/completions?x=1 HTTP/1.1\r\nHost: gateway.example\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`),
    body,
  ]);
  const res = await rawExchange(gw.port, bytes);
  assert.equal(res.status, 200, res.body.toString().slice(0, 200));
  assert.equal(backend.apiRequests.at(-1).url, '/v1/chat/completions?x=1');
  const health = await rawExchange(gw.port, Buffer.from('GET HTTPS://gateway.example/health HTTP/1.1\r\nHost: gateway.example\r\n\r\n'));
  assert.equal(health.status, 200);
  const root = await rawExchange(gw.port, Buffer.from('GET http://gateway.example HTTP/1.1\r\nHost: gateway.example\r\n\r\n'));
  assert.equal(root.status, 404);
  assert.match(openAIError(root).message, /Unknown path \/\./);
});
