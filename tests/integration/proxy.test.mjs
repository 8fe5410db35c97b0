// The proxy path: bodies byte-identical to the backend's, the headers the gateway adds, forwards
// or drops, upstream error statuses, and upstream connection reuse.
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
  postJson,
  chatBody,
  rawExchange,
  rawRequest,
  keepAliveAgent,
  fillerText,
  openStream,
  readAll,
  httpRequest,
  waitUntil,
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

// Writes `body` in pieces split at the given byte offsets, each piece a separate write.
async function writePieces(res, body, offsets) {
  let start = 0;
  for (const end of [...offsets, body.length]) {
    if (end > start) {
      await new Promise((resolve) => res.write(body.subarray(start, end), resolve));
    }
    start = end;
  }
  res.end();
}

function fixedHandler(status, headers, body, offsets) {
  return async (req, res) => {
    res.writeHead(status, headers);
    if (offsets) await writePieces(res, body, offsets);
    else res.end(body);
  };
}

test('non-stream body reaches the client byte for byte', { timeout: 20_000 }, async () => {
  // Odd spacing, escaped and raw UTF-8, a trailing newline: anything a re-serialiser would change.
  const body = Buffer.from(
    '{"id":"chatcmpl-fixed",  "object":"chat.completion","created":1700000000,"model":"m1",\n' +
      ' "choices":[{"index":0,"message":{"role":"assistant","content":"h\\u00e9llo w\u00f6rld \u2713"},"finish_reason":"stop"}],' +
      '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"extra":1.50e+2}\n',
  );
  backend.handler = fixedHandler(200, { 'content-type': 'application/json', 'content-length': body.length }, body);
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200);
  assert.ok(res.body.equals(body), `body differs:\n got ${res.text()}\nwant ${body}`);
  assert.match(String(res.headers['content-type']), /application\/json/);
});

test('a ~1 MB non-stream body with Content-Length is byte-identical', { timeout: 30_000 }, async () => {
  const body = Buffer.from(
    JSON.stringify({
      id: 'chatcmpl-big',
      object: 'chat.completion',
      created: 1,
      model: 'm1',
      choices: [{ index: 0, message: { role: 'assistant', content: fillerText(1_000_000, 7) }, finish_reason: 'length' }],
      usage: { prompt_tokens: 10, completion_tokens: 250000, total_tokens: 250010 },
    }),
  );
  backend.handler = fixedHandler(200, { 'content-type': 'application/json', 'content-length': body.length }, body);
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { timeout: 25_000 });
  assert.equal(res.status, 200);
  assert.equal(res.body.length, body.length);
  assert.ok(res.body.equals(body), 'large body differs');
});

test('a ~1 MB chunked non-stream body is byte-identical', { timeout: 30_000 }, async () => {
  const body = Buffer.from(
    JSON.stringify({
      id: 'cmpl-big',
      object: 'text_completion',
      created: 1,
      model: 'm1',
      choices: [{ index: 0, text: fillerText(1_048_000, 11), finish_reason: 'length' }],
      usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 },
    }),
  );
  // Uneven pieces: 1 byte, a few bytes, 64 KiB + 1, then the rest in ~100 KB steps.
  const offsets = [1, 7, 65_544];
  for (let o = 200_000; o < body.length; o += 99_991) offsets.push(o);
  backend.handler = fixedHandler(200, { 'content-type': 'application/json' }, body, offsets);
  const res = await postJson(gw.url, '/v1/completions', { model: 'm1', prompt: 'x' }, { timeout: 25_000 });
  assert.equal(res.status, 200);
  assert.equal(res.body.length, body.length);
  assert.ok(res.body.equals(body), 'chunked large body differs');
});

test('a client that stops reading holds the stream back, then gets every byte in order', { timeout: 60_000 }, async () => {
  // 8 MB of events, far more than the socket buffers on both sides hold: with the client paused,
  // the gateway's writes must wait (bytes kept for it, not dropped), and its reads from the
  // backend must stop, until the backend itself sees backpressure.
  const event = (i) => `data: {"i":${i},"pad":"${'x'.repeat(1000)}"}\n\n`;
  const total = 8000;
  const expected = Buffer.from(Array.from({ length: total }, (_, i) => event(i)).join(''));
  let backendBlocked;
  const blocked = new Promise((resolve) => (backendBlocked = resolve));
  backend.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    for (let i = 0; i < total; i++) {
      if (!res.write(event(i))) {
        backendBlocked();
        await new Promise((resolve) => res.once('drain', resolve));
      }
    }
    res.end();
  };
  const { res } = await openStream(`${gw.url}/v1/chat/completions`, {
    body: JSON.stringify(chatBody('m1', { stream: true, stream_options: { include_usage: true } })),
    headers: { 'content-type': 'application/json' },
  });
  assert.equal(res.statusCode, 200);
  res.pause();
  await blocked;
  const reading = readAll(res, 50_000);
  res.resume();
  const got = await reading;
  assert.equal(got.length, expected.length);
  assert.ok(got.equals(expected), 'the stream differs after backpressure');
});

const SSE_BODY = Buffer.from(
  'data: {"id":"chatcmpl-sse","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n' +
    ': ping\n\n' +
    'data:{"id":"chatcmpl-sse","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{"content":"Gr\\u00fc\\u00df "},"finish_reason":null}],"usage":null}\r\n\r\n' +
    'event: message\nid: 7\nretry: 1000\ndata: {"id":"chatcmpl-sse","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{"content":"Gott \u2713 \u00fc"},"finish_reason":null}],"usage":null}\n\n' +
    'data: {"id":"chatcmpl-sse","object":"chat.completion.chunk","created":1,"model":"m1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\r\r' +
    'data: {"id":"chatcmpl-sse","object":"chat.completion.chunk","created":1,"model":"m1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n' +
    'data: [DONE]\n\n',
);

// Split points: inside "data:", inside a line ending pair, inside the multi-byte check mark.
function sseOffsets() {
  const s = SSE_BODY;
  const check = s.indexOf(Buffer.from('\u2713'));
  const crlf = s.indexOf('\r\n\r\n');
  return [3, 60, crlf + 1, crlf + 3, check + 1, check + 2, s.indexOf('[DONE]') + 2];
}

// SSE_BODY ends with a usage-only chunk: the client asks for usage, so the gateway relays every
// byte (a client that did not ask would not see that chunk: usage_*.test.mjs).
const STREAM_WITH_USAGE = { stream: true, stream_options: { include_usage: true } };

test('a chunked SSE stream is byte-identical, unbuffered-marked and has no Content-Length', { timeout: 20_000 }, async () => {
  backend.handler = fixedHandler(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' }, SSE_BODY, sseOffsets());
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', STREAM_WITH_USAGE));
  assert.equal(res.status, 200);
  assert.ok(res.body.equals(SSE_BODY), `stream differs:\n got ${JSON.stringify(res.text())}\nwant ${JSON.stringify(SSE_BODY.toString())}`);
  assert.match(String(res.headers['content-type']), /text\/event-stream/);
  assert.equal(res.headers['x-accel-buffering'], 'no');
  assert.equal(res.headers['content-length'], undefined, 'a stream must not get a Content-Length');
});

test('an SSE stream sent with Content-Length by the backend is byte-identical', { timeout: 20_000 }, async () => {
  backend.handler = fixedHandler(200, { 'content-type': 'text/event-stream', 'content-length': SSE_BODY.length }, SSE_BODY, sseOffsets());
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', STREAM_WITH_USAGE));
  assert.equal(res.status, 200);
  assert.ok(res.body.equals(SSE_BODY), 'stream with Content-Length differs');
});

test('a stream header that arrives with the start of a chunk-size line reaches the client before the first event', { timeout: 20_000 }, async () => {
  // The backend's header and the first digit of its first chunk's size come in one packet, then
  // nothing until the test says so (a prefill): the client must have the status meanwhile.
  const event = Buffer.from('data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n');
  const size = event.length.toString(16);
  assert.ok(size.length >= 2, 'the event must need two hex digits');
  let release;
  const released = new Promise((resolve) => (release = resolve));
  backend.handler = async (req, res, body, record) => {
    const s = record.socket;
    s.write(`HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${size[0]}`);
    await released;
    s.end(Buffer.concat([Buffer.from(`${size.slice(1)}\r\n`), event, Buffer.from('\r\n0\r\n\r\n')]));
  };
  const { res } = await openStream(`${gw.url}/v1/chat/completions`, {
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(chatBody('m1', STREAM_WITH_USAGE)),
    timeout: 5_000,
  }).finally(() => release());
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['content-type'], 'text/event-stream');
  const got = await readAll(res);
  assert.ok(got.equals(event), `body differs: ${JSON.stringify(got.toString())}`);
});

test('X-Request-Id is generated when absent, returned, and forwarded upstream', { timeout: 20_000 }, async () => {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const r1 = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  const r2 = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(r1.status, 200);
  assert.equal(r2.status, 200);
  const id1 = r1.headers['x-request-id'];
  const id2 = r2.headers['x-request-id'];
  assert.ok(typeof id1 === 'string' && id1.length > 0, 'no X-Request-Id on the response');
  assert.ok(typeof id2 === 'string' && id2.length > 0, 'no X-Request-Id on the second response');
  assert.notEqual(id1, id2, 'generated request ids must differ');
  const seen = backend.apiRequests.slice(before);
  assert.equal(seen.length, 2);
  assert.equal(seen[0].headers['x-request-id'], id1, 'backend did not see the generated id');
  assert.equal(seen[1].headers['x-request-id'], id2);
});

test("the client's X-Request-Id is echoed and forwarded upstream", { timeout: 20_000 }, async () => {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const id = 'it-req-0123456789abcdef';
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } });
  assert.equal(res.status, 200);
  assert.equal(res.headers['x-request-id'], id);
  const seen = backend.apiRequests.slice(before);
  assert.equal(seen.length, 1);
  assert.equal(seen[0].headers['x-request-id'], id);
  // Also on a stream.
  backend.handler = fixedHandler(200, { 'content-type': 'text/event-stream' }, SSE_BODY);
  const s = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }), { headers: { 'x-request-id': 'it-stream-id' } });
  assert.equal(s.status, 200);
  assert.equal(s.headers['x-request-id'], 'it-stream-id');
  assert.equal(backend.apiRequests.at(-1).headers['x-request-id'], 'it-stream-id');
});

test('X-Forwarded-For reaches the backend with the client address', { timeout: 20_000 }, async () => {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200);
  const xff = backend.apiRequests[before].headers['x-forwarded-for'];
  assert.ok(xff, 'backend saw no X-Forwarded-For');
  assert.deepEqual(xff.split(',').map((s) => s.trim()), ['127.0.0.1']);
});

test("X-Forwarded-For appends the client address to the client's own list", { timeout: 20_000 }, async () => {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-forwarded-for': '192.0.2.7' } });
  assert.equal(res.status, 200);
  const xff = backend.apiRequests[before].headers['x-forwarded-for'];
  assert.deepEqual(String(xff).split(',').map((s) => s.trim()), ['192.0.2.7', '127.0.0.1']);
});

// A chat request with these header fields besides Host, Content-Type and Content-Length, sent
// as raw bytes; the answer must be 200. Returns it, the body, and what the backend received.
async function rawChatWith(fields) {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const body = JSON.stringify(chatBody('m1'));
  const head = [
    ['Host', `127.0.0.1:${gw.port}`],
    ['Content-Type', 'application/json'],
    ['Content-Length', String(Buffer.byteLength(body))],
  ];
  const res = await rawExchange(gw.port, rawRequest('POST', '/v1/chat/completions', [...head, ...fields], body));
  assert.equal(res.status, 200);
  const seen = backend.apiRequests.slice(before);
  assert.equal(seen.length, 1);
  return { res, body, seen };
}

test('hop-by-hop request headers are not forwarded; end-to-end ones are', { timeout: 20_000 }, async () => {
  const { body, seen } = await rawChatWith([
    ['Connection', 'close, X-Custom, X-Forwarded-For'],
    ['X-Custom', 'must-not-pass'],
    ['X-Forwarded-For', '198.51.100.9'],
    ['Keep-Alive', 'timeout=5, max=100'],
    ['Proxy-Connection', 'keep-alive'],
    ['Authorization', 'Bearer sk-it-test'],
    ['X-End-To-End', 'kept'],
  ]);
  const h = seen[0].headers;
  assert.equal(h['x-custom'], undefined, 'a header named in Connection was forwarded');
  assert.equal(h['x-forwarded-for'], '127.0.0.1', 'an X-Forwarded-For named in Connection was forwarded');
  assert.equal(h['keep-alive'], undefined, 'Keep-Alive was forwarded');
  assert.equal(h['proxy-connection'], undefined, 'Proxy-Connection was forwarded');
  assert.ok(!/x-custom/i.test(h.connection ?? ''), `Connection forwarded as ${h.connection}`);
  assert.equal(h.authorization, 'Bearer sk-it-test');
  assert.equal(h['x-end-to-end'], 'kept');
  assert.equal(seen[0].body.toString(), body, 'non-stream request body changed');
});

test('several Connection fields are one list: what any of them names is not forwarded, a close in any closes', { timeout: 20_000 }, async () => {
  const { res, seen } = await rawChatWith([
    ['Connection', 'keep-alive'],
    ['Connection', 'X-Hop'],
    ['Connection', 'close'],
    ['X-Hop', 'must-not-pass'],
  ]);
  assert.deepEqual(res.headers.connection, ['close'], 'a close in the third Connection field was ignored');
  assert.equal(seen[0].headers['x-hop'], undefined, 'a header named in the second Connection field was forwarded');
});

test("the gateway's own upstream fields replace the client's: Host, X-Forwarded-*, X-Request-Id, Content-Length", { timeout: 20_000 }, async () => {
  backend.handler = null;
  const before = backend.apiRequests.length;
  const body = JSON.stringify(chatBody('m1'));
  // A chunked body: the backend gets it with a Content-Length instead.
  const size = Buffer.byteLength(body).toString(16);
  const bytes = rawRequest(
    'POST',
    '/v1/chat/completions',
    [
      ['Host', 'client-chosen.example'],
      ['Content-Type', 'application/json'],
      ['Transfer-Encoding', 'chunked'],
      ['X-Forwarded-For', '192.0.2.1'],
      ['X-Forwarded-For', '192.0.2.2'],
      ['X-Forwarded-Proto', 'https'],
      ['X-Request-Id', 'it-own-fields'],
      ['X-End-To-End', 'kept'],
    ],
    `${size}\r\n${body}\r\n0\r\n\r\n`,
  );
  const res = await rawExchange(gw.port, bytes);
  assert.equal(res.status, 200);
  const seen = backend.apiRequests.slice(before);
  assert.equal(seen.length, 1);
  // Each field name once, with the gateway's value.
  const raw = seen[0].rawHeaders;
  const pairs = [];
  for (let i = 0; i < raw.length; i += 2) pairs.push([raw[i].toLowerCase(), raw[i + 1]]);
  const only = (name) => {
    const found = pairs.filter(([n]) => n === name).map(([, v]) => v);
    assert.equal(found.length, 1, `${name}: ${JSON.stringify(found)} in ${JSON.stringify(raw)}`);
    return found[0];
  };
  assert.equal(only('host'), new URL(backend.url).host);
  assert.equal(only('x-forwarded-for'), '192.0.2.1, 192.0.2.2, 127.0.0.1', 'the X-Forwarded-For fields joined, extended');
  assert.equal(only('x-forwarded-proto'), 'http');
  assert.equal(only('x-request-id'), 'it-own-fields');
  assert.equal(only('content-length'), String(Buffer.byteLength(body)));
  assert.equal(only('x-end-to-end'), 'kept');
  assert.equal(pairs.filter(([n]) => n === 'transfer-encoding').length, 0, 'Transfer-Encoding was forwarded');
  assert.equal(seen[0].body.toString(), body);
});

test('hop-by-hop response headers from the backend are not forwarded to the client', { timeout: 20_000 }, async () => {
  const body = Buffer.from(chatCompletionLike());
  backend.handler = async (req, res) => {
    res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': body.length,
      connection: 'keep-alive, X-Backend-Private',
      'x-backend-private': 'secret',
      'keep-alive': 'timeout=60',
      'x-backend-public': 'visible',
    });
    res.end(body);
  };
  const bytes = rawRequest('POST', '/v1/chat/completions', [
    ['Host', `127.0.0.1:${gw.port}`],
    ['Content-Type', 'application/json'],
    ['Content-Length', String(Buffer.byteLength(JSON.stringify(chatBody('m1'))))],
  ], JSON.stringify(chatBody('m1')));
  const res = await rawExchange(gw.port, bytes);
  assert.equal(res.status, 200);
  assert.equal(res.headers['x-backend-private'], undefined, 'a header named in the backend Connection header reached the client');
  assert.equal(res.headers['x-backend-public']?.[0], 'visible');
  assert.ok(res.body.equals(body));
});

function chatCompletionLike() {
  return '{"id":"x","object":"chat.completion","created":1,"model":"m1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}';
}

test('an upstream 429 before any event reaches a streaming client as 429 with its body', { timeout: 20_000 }, async () => {
  const body = Buffer.from('{"error":{"message":"Rate limit reached for m1","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}');
  backend.handler = fixedHandler(429, { 'content-type': 'application/json', 'content-length': body.length, 'retry-after': '7' }, body);
  const before = backend.apiRequests.length;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream: true }));
  assert.equal(res.status, 429);
  assert.ok(res.body.equals(body), `429 body differs: ${res.text()}`);
  assert.equal(res.headers['retry-after'], '7');
  assert.equal(backend.apiRequests.length - before, 1, 'a 429 must not be retried');
});

test('an upstream 500 on a non-stream request passes through and is not retried', { timeout: 20_000 }, async () => {
  const body = Buffer.from('{"error":{"message":"boom","type":"server_error","param":null,"code":null}}');
  backend.handler = fixedHandler(500, { 'content-type': 'application/json', 'content-length': body.length }, body);
  const before = backend.apiRequests.length;
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 500);
  assert.ok(res.body.equals(body));
  assert.equal(backend.apiRequests.length - before, 1);
});

test('many sequential requests reuse a few upstream connections', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'ka', threads: 1 });
  const workers = 2;
  const gw2 = await startGateway({ server: { workers }, backends: [backendEntry(mock, { name: 'ka' })] });
  const s0 = await mockStats(mock);
  const agent = keepAliveAgent();
  for (let i = 0; i < 50; i++) {
    const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'), { agent });
    assert.equal(res.status, 200, res.text());
  }
  // A new client connection for each request must not mean a new upstream connection either.
  for (let i = 0; i < 50; i++) {
    const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200, res.text());
  }
  const s1 = await mockStats(mock);
  // Our own two stats requests each used one connection of their own.
  const upstream = s1.connections_accepted - s0.connections_accepted - 1;
  assert.ok(upstream >= 1);
  assert.ok(upstream <= workers * 2, `100 requests opened ${upstream} upstream connections`);
  assert.equal(Number(s1.by_path['/v1/chat/completions']) - Number(s0.by_path?.['/v1/chat/completions'] ?? 0), 100);
});

test('a backend that resets every request on a kept-alive connection gets it at most once more than max_retries allows', { timeout: 30_000 }, async () => {
  const a = await startBackend('ra');
  const b = await startBackend('rb');
  const gw2 = await startGateway({
    server: { workers: 1 },
    load_balancing: { max_retries: 1 },
    backends: [backendEntry(a, { name: 'ra' }), backendEntry(b, { name: 'rb' })],
  });
  // One answered request each: both now have a pooled keep-alive connection.
  for (let i = 0; i < 2; i++) assert.equal((await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  const before = a.apiRequests.length + b.apiRequests.length;
  // From now on each backend reads the request whole, then resets the connection.
  const reset = async (req) => req.socket.resetAndDestroy();
  a.handler = reset;
  b.handler = reset;
  const retriesBefore = metricValue(await scrape(gw2), 'llmproxy_retries_total');
  const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 502, res.text().slice(0, 300));
  // Two attempts (max_retries 1), plus one replay on a fresh connection in place of the pooled
  // one: never a replay per attempt, which made it four.
  assert.equal(a.apiRequests.length + b.apiRequests.length - before, 3);
  assert.equal(metricValue(await scrape(gw2), 'llmproxy_retries_total') - retriesBefore, 2);
});

test('stray bytes a backend wrote after its answer on a pooled connection: the next request goes on a fresh one', { timeout: 30_000 }, async () => {
  const be = await startBackend('stray');
  const gw2 = await startGateway({ server: { workers: 1 }, load_balancing: { max_retries: 0 }, backends: [backendEntry(be, { name: 'stray' })] });
  let strayWritten;
  const written = new Promise((resolve) => (strayWritten = resolve));
  be.handler = async (req, res) => {
    const body = '{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}';
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body, () => setTimeout(() => req.socket.write('data: junk\n\n', strayWritten), 20));
  };
  assert.equal((await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  await written;
  be.handler = null;
  const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text().slice(0, 300));
});

test('a malformed answer on a pooled connection is not replayed: the backend ran the request', { timeout: 30_000 }, async () => {
  const be = await startBackend('bad');
  const gw2 = await startGateway({ server: { workers: 1 }, load_balancing: { max_retries: 0 }, backends: [backendEntry(be, { name: 'bad' })] });
  assert.equal((await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'))).status, 200);
  const before = be.apiRequests.length;
  // An answer whose header does not parse, on the connection the first request left pooled.
  be.handler = async (req) => req.socket.write('HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}');
  const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 502, res.text().slice(0, 300));
  assert.equal(be.apiRequests.length - before, 1, 'the request was sent again');
});

test('any byte of an answer means the backend ran the request: never replayed, on a pooled connection or another', { timeout: 60_000 }, async () => {
  const be = await startBackend('began');
  const gw2 = await startGateway({ server: { workers: 1 }, load_balancing: { max_retries: 2 }, backends: [backendEntry(be, { name: 'began' })] });
  const early = 'HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n';
  const answers = {
    'a header cut short, then a reset': (req) => {
      req.socket.write('HTTP/1.1 200 OK\r\nContent-Ty', () => req.socket.resetAndDestroy());
    },
    'an interim 100 Continue, then the connection closed': (req) => req.socket.end('HTTP/1.1 100 Continue\r\n\r\n'),
    'an interim 103, then a reset': (req) => req.socket.write(early, () => req.socket.resetAndDestroy()),
    'eight interim answers and no final one': (req) => req.socket.write(early.repeat(8)),
  };
  for (const [what, answer] of Object.entries(answers)) {
    for (const stream of [false, true]) {
      const label = `${what} (${stream ? 'stream' : 'non-stream'})`;
      // A first request leaves a pooled connection, the one the stale-connection rule replays on.
      be.handler = null;
      assert.equal((await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'))).status, 200, label);
      const before = be.apiRequests.length;
      be.handler = async (req) => answer(req);
      const res = await postJson(gw2.url, '/v1/chat/completions', { ...chatBody('m1'), stream });
      assert.equal(res.status, 502, `${label}: ${res.text().slice(0, 300)}`);
      assert.match(res.json().error.message, /invalid response/, label);
      assert.equal(be.apiRequests.length - before, 1, `${label}: the request was sent again`);
    }
  }
});

test('an answer cut short or malformed is not sent to another backend: the first one ran the request', { timeout: 30_000 }, async () => {
  const a = await startBackend('half-a');
  const b = await startBackend('half-b');
  const gw2 = await startGateway({
    server: { workers: 1 },
    load_balancing: { max_retries: 1 },
    backends: [backendEntry(a, { name: 'ha' }), backendEntry(b, { name: 'hb' })],
  });
  const answers = [
    (req) => req.socket.write('HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}'),
    (req) => req.socket.end('HTTP/1.1 200 OK\r\nContent-Type: appl'),
  ];
  for (const answer of answers) {
    const before = a.apiRequests.length + b.apiRequests.length;
    a.handler = async (req) => answer(req);
    b.handler = async (req) => answer(req);
    const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 502, res.text().slice(0, 300));
    assert.equal(res.json().error.code, 'upstream_error');
    assert.match(res.json().error.message, /invalid response/);
    assert.equal(a.apiRequests.length + b.apiRequests.length - before, 1, 'the request was sent to a second backend');
  }
});

async function scrape(g) {
  const res = await httpRequest(`${g.url}/metrics`);
  assert.equal(res.status, 200);
  return res.text();
}

function metricValue(text, name) {
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

test('a stale pooled connection is replaced by a new one, never by another pooled one that may be as dead', { timeout: 30_000 }, async () => {
  const be = await startBackend('pool');
  const gw2 = await startGateway({ server: { workers: 1 }, load_balancing: { max_retries: 0 }, backends: [backendEntry(be, { name: 'pool' })] });
  // Two requests at once: the worker opens two upstream connections and pools both.
  let release;
  const held = new Promise((resolve) => (release = resolve));
  let arrived = 0;
  be.handler = async (req, res) => {
    if (++arrived === 2) release();
    await held;
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"id":"x","object":"chat.completion","choices":[]}');
  };
  const both = await Promise.all([0, 1].map(() => postJson(gw2.url, '/v1/chat/completions', chatBody('m1'))));
  assert.deepEqual(both.map((r) => r.status), [200, 200]);
  // (The gateway's model discovery made a connection of its own at start, closed since.)
  await waitUntil(() => be.sockets.size === 2, { timeout: 5_000, what: 'two pooled connections at the backend' });
  // The backend closes both idle connections (as a keep-alive timeout or a restart would).
  for (const s of be.sockets) s.destroy();
  be.handler = null;
  const accepted = be.connectionsAccepted;
  const res = await postJson(gw2.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text().slice(0, 300));
  assert.equal(be.connectionsAccepted, accepted + 1, 'the replay opened a new connection');
});
