// HTTP framing corner cases where a proxy can desynchronise or truncate: interim 1xx responses
// from the backend, backend answers framed in ways that cannot be relayed (101, transfer codings
// other than chunked or in HTTP/1.0, 204 with a length, several Connection fields), HTTP/1.0 clients, and
// request bodies of undefined length.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
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
  connect,
  parseResponse,
  httpRequest,
  withTimeout,
  waitUntil,
  deferred,
  listenLoopback,
  closeServer,
} from './lib/harness.mjs';
import { scrapeMetrics, metricSum } from './lib/usage.mjs';

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

// Every byte a connection receives until the gateway closes it.
async function bytesUntilClose(port, bytes) {
  const socket = await connect(port);
  return await new Promise((resolve, reject) => {
    const parts = [];
    const timer = setTimeout(() => reject(new Error(`no close after ${Buffer.concat(parts).length} bytes`)), 10_000);
    socket.on('data', (d) => parts.push(d));
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(parts));
    });
    socket.on('error', () => {});
    socket.write(bytes);
  });
}

// HEAD `path`, with a GET /health pipelined behind it.
const headThenGet = (path) => `HEAD ${path} HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`;

// The first header a connection received (as text) and every byte after it.
function splitAtHead(bytes) {
  const text = bytes.toString('latin1');
  const end = text.indexOf('\r\n\r\n') + 4;
  return { first: text.slice(0, end), rest: text.slice(end) };
}

test('an HTTP/1.0 client asking for keep-alive is told the connection stays open, on proxied and own answers', async () => {
  const backend = await startBackend('ka10');
  const gw = await startGateway({ backends: [backendEntry(backend, { name: 'ka10', models: ['m1'] })] });
  const body = JSON.stringify({ model: 'm1', messages: [] });
  const chat = `POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
  // Without `Connection: keep-alive` in the answer, an HTTP/1.0 client (ab -k) waits for the
  // close; the last request asks for none and gets the close it expects.
  const bytes = chat + 'GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n' + 'GET /health HTTP/1.0\r\n\r\n';
  let rest = await bytesUntilClose(gw.port, Buffer.from(bytes));
  const answers = [];
  while (rest.length > 0) {
    const r = parseResponse(rest, true);
    answers.push(r);
    rest = rest.subarray(r.consumed);
  }
  assert.deepEqual(answers.map((r) => r.status), [200, 200, 200]);
  assert.equal(answers[0].headers.connection?.[0], 'keep-alive', 'proxied answer');
  assert.equal(answers[1].headers.connection?.[0], 'keep-alive', "the gateway's own answer");
  assert.notEqual(answers[2].headers.connection?.[0], 'keep-alive');
  assert.equal(backend.apiRequests.length, 1);
});

test('HEAD gets the header GET would get and no body, so the next response on the connection stays in sync', async () => {
  const backend = await startBackend('head');
  const gw = await startGateway({ backends: [backendEntry(backend, { name: 'head', models: ['m1'] })] });
  for (const path of ['/health', '/v1/models', '/ready', '/metrics']) {
    const get = await httpRequest(`${gw.url}${path}`);
    assert.equal(get.status, 200, `GET ${path}: ${get.text()}`);
    const { first, rest } = splitAtHead(await bytesUntilClose(gw.port, headThenGet(path)));
    assert.match(first, /^HTTP\/1\.1 200 /, `HEAD ${path}: ${first}`);
    // The length GET's body has (metrics move between two scrapes: only their presence then).
    const length = Number(/\r\ncontent-length: (\d+)\r\n/i.exec(first)?.[1]);
    assert.ok(length > 0, `HEAD ${path} has no Content-Length: ${first}`);
    if (path !== '/metrics') assert.equal(length, Buffer.byteLength(get.text()), `HEAD ${path} length`);
    // The next bytes are the second response's status line: no body came after the header.
    assert.ok(rest.startsWith('HTTP/1.1 200 '), `after HEAD ${path}: ${JSON.stringify(rest.slice(0, 80))}`);
    const second = parseResponse(Buffer.from(rest, 'latin1'), true);
    assert.equal(JSON.parse(second.body.toString()).status, 'ok');
  }
  // Refusals to HEAD carry no body either: an unknown path, and a POST-only route.
  for (const [path, status, allow] of [['/nope', 404, undefined], ['/v1/chat/completions', 405, 'POST']]) {
    const { first, rest } = splitAtHead(await bytesUntilClose(gw.port, headThenGet(path)));
    assert.match(first, new RegExp(`^HTTP/1\\.1 ${status} `), first.slice(0, 200));
    if (allow) assert.match(first, new RegExp(`\r\nallow: ${allow}\r\n`, 'i'));
    assert.ok(rest.length === 0 || rest.startsWith('HTTP/1.1 200 '), `after HEAD ${path}: ${JSON.stringify(rest.slice(0, 80))}`);
  }
  // A HEAD refused for its declared body size (the header was read) is a header alone too.
  {
    const { first, rest } = splitAtHead(await bytesUntilClose(gw.port, 'HEAD /health HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n'));
    assert.match(first, /^HTTP\/1\.1 413 /, first.slice(0, 200));
    assert.equal(rest, '', 'a body after the 413 to HEAD');
  }
  // GET-only routes name HEAD as allowed.
  const post = await httpRequest(`${gw.url}/health`, { method: 'POST', body: '' });
  assert.equal(post.status, 405);
  assert.equal(post.headers.allow, 'GET, HEAD');
  assert.equal(backend.apiRequests.length, 0);
});

test('a malformed chunked request body is answered 400, not taken for a client hang-up', async () => {
  const backend = await startBackend('chunk');
  const gw = await startGateway({ backends: [backendEntry(backend, { name: 'chunk' })] });
  const before = metricSum(await scrapeMetrics(gw), 'llmproxy_client_disconnects_total');
  for (const chunks of ['zz\r\n{}\r\n0\r\n\r\n', '2\r\n{}XX0\r\n\r\n', 'fffffffffffffffff\r\n{}\r\n0\r\n\r\n']) {
    const head = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n';
    const res = await rawExchange(gw.port, Buffer.from(head + chunks, 'latin1'));
    assert.ok(res.status === 400 || res.status === 413, `${JSON.stringify(chunks)}: ${res.status}`);
    assert.equal(openAIError(res).type, 'invalid_request_error', JSON.stringify(chunks));
    assert.equal(res.headers.connection?.[0], 'close');
  }
  assert.equal(backend.apiRequests.length, 0);
  assert.equal(metricSum(await scrapeMetrics(gw), 'llmproxy_client_disconnects_total'), before);
});

test('connections that arrive together are taken together, never past server.max_connections; idle keep-alive ones make room', { timeout: 60_000 }, async () => {
  const backend = await startBackend('burst');
  const limit = 8;
  const gw = await startGateway({
    server: { workers: 1, max_connections: limit },
    timeouts: { keepalive: '60s', client_header: '60s' },
    metrics: { listen: '127.0.0.1:0' },
    backends: [backendEntry(backend, { name: 'burst' })],
  });
  const metricsUrl = /metrics on (http:\/\/127\.0\.0\.1:\d+)\/metrics/.exec(gw.stdout)[1];
  const scrape = async () => (await httpRequest(`${metricsUrl}/metrics`)).text();
  const openNow = async () => metricSum(await scrape(), 'llmproxy_open_connections');
  // Connections that have sent nothing yet hold their places (bounded by client_header, never
  // reclaimed: they have not been served).
  const held = [];
  for (let i = 0; i < limit; i++) held.push(await healthAsker(gw.port));
  await waitUntil(async () => (await openNow()) === limit, { timeout: 10_000, what: `${limit} connections taken` });
  // Twice the limit waits in the listen backlog, each with its request sent.
  const waiting = [];
  for (let i = 0; i < 2 * limit; i++) waiting.push(await healthAsker(gw.port));
  const answered = new Set();
  const answers = waiting.map((c, i) => c.ask().then((r) => { answered.add(i); return r; }));
  await openNow(); // a round trip through the worker's event loop after they arrived
  assert.equal(answered.size, 0);
  // Every slot freed at once: the gateway finds them all waiting, and takes only what fits.
  for (const c of held) c.socket.destroy();
  await waitUntil(() => answered.size >= limit, { timeout: 10_000, interval: 5, what: `${limit} answers` });
  assert.ok((await openNow()) <= limit, `open: ${await openNow()}`);
  // Those answered now wait idle for a next request: closed to make room for the rest.
  const got = await withTimeout(Promise.all(answers), 10_000, 'every answer');
  assert.ok(got.every((r) => r.status === 200));
  assert.ok((await openNow()) <= limit, `open: ${await openNow()}`);
  assert.ok(metricSum(await scrape(), 'llmproxy_idle_connections_reclaimed_total') >= limit);
});

// A keep-alive connection that asks GET /health and resolves with each complete answer.
async function healthAsker(port) {
  const socket = await connect(port);
  let buf = Buffer.alloc(0);
  let waiting = null;
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    const r = parseResponse(buf);
    if (r && waiting) {
      buf = Buffer.alloc(0);
      const w = waiting;
      waiting = null;
      w(r);
    }
  });
  socket.on('error', () => {});
  return {
    socket,
    ask() {
      return new Promise((resolve) => {
        waiting = resolve;
        socket.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
      });
    },
  };
}

test('server.max_connections is the process limit: with 2 workers every connection up to it is taken, the next wait for one to close', { timeout: 60_000 }, async () => {
  const backend = await startBackend('limit');
  const limit = 24;
  const workers = 2;
  const gw = await startGateway({
    server: { workers, max_connections: limit },
    // A connection held back would wait this long for a slot; those holding places have sent
    // nothing, so no idle keep-alive connection is closed to make room.
    timeouts: { keepalive: '60s', client_header: '60s' },
    metrics: { listen: '127.0.0.1:0' },
    backends: [backendEntry(backend, { name: 'limit' })],
  });
  const metricsUrl = /metrics on (http:\/\/127\.0\.0\.1:\d+)\/metrics/.exec(gw.stdout)[1];
  // Scraped on the metrics listener, whose connections are not client connections.
  const openNow = async () => metricSum((await httpRequest(`${metricsUrl}/metrics`)).text(), 'llmproxy_open_connections');
  // Scrapers on the metrics listener take no client place.
  const metricsPort = Number(new URL(metricsUrl).port);
  const scrapers = [];
  for (let i = 0; i < 3; i++) {
    const c = await healthAsker(metricsPort);
    await withTimeout(c.ask(), 10_000, 'an answer on the metrics listener');
    scrapers.push(c);
  }
  // The kernel spreads connections over the workers' listeners by hash: with a share per
  // worker, some of these would wait while the other worker had room.
  const held = [];
  for (let i = 0; i < limit; i++) held.push(await healthAsker(gw.port));
  await waitUntil(async () => (await openNow()) === limit, { timeout: 10_000, what: `all ${limit} taken` });
  // Over the limit: asked, not answered while every slot is taken (a worker already waiting in
  // accept may take workers - 1 more).
  const extra = [];
  for (let i = 0; i < workers + 2; i++) extra.push(await healthAsker(gw.port));
  const answered = new Set();
  const answers = extra.map((c, i) => c.ask().then((r) => { answered.add(i); return r; }));
  await openNow(); // a round trip through the gateway after the extra connections arrived
  assert.ok((await openNow()) <= limit + workers - 1, `open: ${await openNow()}`);
  assert.ok(answered.size <= workers - 1, `answered over the limit: ${answered.size}`);
  // Slots freed: every waiting connection is taken and answered.
  for (const c of held.slice(0, extra.length)) c.socket.destroy();
  const got = await withTimeout(Promise.all(answers), 10_000, 'answers once slots were freed');
  assert.ok(got.every((r) => r.status === 200));
});

test('at server.max_connections an idle keep-alive connection is closed to let a new one in', { timeout: 30_000 }, async () => {
  const backend = await startBackend('reclaim');
  const limit = 4;
  const gw = await startGateway({
    server: { workers: 1, max_connections: limit },
    timeouts: { keepalive: '60s' }, // without reclaiming, the new connection would wait this long
    metrics: { listen: '127.0.0.1:0' },
    backends: [backendEntry(backend, { name: 'reclaim' })],
  });
  const metricsUrl = /metrics on (http:\/\/127\.0\.0\.1:\d+)\/metrics/.exec(gw.stdout)[1];
  const idle = [];
  for (let i = 0; i < limit; i++) {
    const c = await healthAsker(gw.port);
    assert.equal((await withTimeout(c.ask(), 10_000, `an answer on connection ${i + 1}`)).status, 200);
    idle.push({ c, closed: new Promise((resolve) => c.socket.on('close', resolve)) });
  }
  // At the limit with no one waiting, nothing is closed: each idle connection still answers.
  for (const [i, x] of idle.entries()) {
    assert.equal((await withTimeout(x.c.ask(), 10_000, `connection ${i + 1} still open`)).status, 200);
  }
  const scrape = async () => (await httpRequest(`${metricsUrl}/metrics`)).text();
  assert.equal(metricSum(await scrape(), 'llmproxy_idle_connections_reclaimed_total'), 0);
  // One waits: the longest idle (the first, asked first above) makes room, and only it.
  const late = await healthAsker(gw.port);
  assert.equal((await withTimeout(late.ask(), 10_000, 'the new connection answered')).status, 200);
  await withTimeout(idle[0].closed, 10_000, 'the longest idle connection closed');
  const text = await scrape();
  assert.equal(metricSum(text, 'llmproxy_idle_connections_reclaimed_total'), 1, text);
  assert.ok(metricSum(text, 'llmproxy_open_connections') <= limit);
  for (const [i, x] of idle.slice(1).entries()) {
    assert.equal((await withTimeout(x.c.ask(), 10_000, `connection ${i + 2} still open`)).status, 200);
  }
});

// A backend written byte by byte: `answer(n, head)` gives the bytes written for the n-th API
// request (0-based, across connections), `head` its request header. The gateway's model
// discovery is answered apart. Each request remembers its connection and each connection when it
// closed, so a test sees which requests shared one.
async function startRawBackend(answer) {
  const b = { requests: [], connections: [], answer };
  const sockets = new Set();
  const server = net.createServer((socket) => {
    const conn = { index: b.connections.length, socket, closed: deferred() };
    b.connections.push(conn);
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => {
      sockets.delete(socket);
      conn.closed.resolve();
    });
    let buf = Buffer.alloc(0);
    socket.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end).toString('latin1');
        const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
        if (buf.length < end + 4 + length) return;
        const body = buf.subarray(end + 4, end + 4 + length).toString();
        buf = buf.subarray(end + 4 + length);
        if (head.startsWith('GET /v1/models')) {
          socket.write('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{"object":"list","data":[]}');
          continue;
        }
        const n = b.requests.length;
        b.requests.push({ head, body, conn });
        socket.write(b.answer(n, head, body));
      }
    });
  });
  const port = await listenLoopback(server);
  b.url = `http://127.0.0.1:${port}`;
  b.close = () => closeServer(server, sockets, 'raw backend');
  return b;
}

function okAnswer(body) {
  const json = JSON.stringify({ echo: JSON.parse(body).marker });
  return `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`;
}

test('a backend answer with a transfer coding other than chunked alone, with Content-Length too, or a 101 is a 502 and its connection is never reused', async () => {
  const cases = [
    ['Transfer-Encoding before Content-Length', 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello'],
    ['chunked and Content-Length', 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n'],
    ['a coding before chunked', 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n'],
    ['a coding alone', 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nhello'],
    ['chunked in HTTP/1.0', 'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n'],
    ['101 Switching Protocols', 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'],
  ];
  for (const [what, bad] of cases) {
    // The first request gets the bad answer; every later one a good one naming its own marker.
    const backend = await startRawBackend((n, head, body) => (n === 0 ? bad : okAnswer(body)));
    try {
      const gw = await startGateway({ server: { workers: 1 }, backends: [{ url: backend.url, name: 'raw' }] });
      const first = await postJson(gw.url, '/v1/chat/completions', { model: 'm1', messages: [], marker: 'a' });
      assert.equal(first.status, 502, `${what}: ${first.status} ${first.text()}`);
      assert.equal(openAIError(first).code, 'upstream_error', what);
      // The gateway closes that connection; bytes the backend writes on it now (an answer the
      // old length-reading would have left there for the next request) reach no client.
      const used = backend.requests[0].conn;
      await withTimeout(used.closed.promise, 10_000, `${what}: the gateway to close the connection`);
      used.socket.write('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{"echo":"INJECTED"}');
      const second = await postJson(gw.url, '/v1/chat/completions', { model: 'm1', messages: [], marker: 'b' });
      assert.equal(second.status, 200, `${what}: ${second.text()}`);
      assert.deepEqual(JSON.parse(second.text()), { echo: 'b' }, `${what}: the next request got another answer`);
      assert.notEqual(backend.requests[1].conn, used, `${what}: the next request went on the refused connection`);
    } finally {
      await backend.close();
    }
  }
});

test('a 204 reaches the client without Content-Length, and a connection whose 204 announced a body is not reused', async () => {
  const backend = await startRawBackend((n, head, body) =>
    n === 0 ? 'HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\n' : okAnswer(body),
  );
  try {
    const gw = await startGateway({ server: { workers: 1 }, backends: [{ url: backend.url, name: 'raw' }] });
    const bytes = jsonRequestBytes({ model: 'm1', messages: [], marker: 'a' });
    const res = await rawExchange(gw.port, bytes);
    assert.equal(res.status, 204);
    assert.equal(res.headers['content-length'], undefined, 'a 204 with Content-Length');
    assert.equal(res.headers['x-kept']?.[0], 'yes');
    await withTimeout(backend.requests[0].conn.closed.promise, 10_000, 'the gateway to close the connection');
    backend.requests[0].conn.socket.write('hello');
    const second = await postJson(gw.url, '/v1/chat/completions', { model: 'm1', messages: [], marker: 'b' });
    assert.equal(second.status, 200, second.text());
    assert.deepEqual(JSON.parse(second.text()), { echo: 'b' });
  } finally {
    await backend.close();
  }
});

test('fields named by any of the backend\'s Connection fields are not forwarded', async () => {
  const backend = await startRawBackend((n, head, body) => {
    const json = JSON.stringify({ echo: JSON.parse(body).marker });
    return `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\nConnection: X-Secret, X-Other\r\nX-Secret: s\r\nX-Other: o\r\nX-Kept: k\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`;
  });
  try {
    const gw = await startGateway({ server: { workers: 1 }, backends: [{ url: backend.url, name: 'raw' }] });
    const res = await rawExchange(gw.port, jsonRequestBytes({ model: 'm1', messages: [], marker: 'a' }));
    assert.equal(res.status, 200);
    assert.equal(res.headers['x-secret'], undefined, 'a field the second Connection field names was forwarded');
    assert.equal(res.headers['x-other'], undefined);
    assert.equal(res.headers['x-kept']?.[0], 'k');
    assert.deepEqual(JSON.parse(res.body.toString()), { echo: 'a' });
  } finally {
    await backend.close();
  }
});

function jsonRequestBytes(payload) {
  const body = JSON.stringify(payload);
  return rawRequest('POST', '/v1/chat/completions', [['Host', 'x'], ['Content-Type', 'application/json'], ['Content-Length', String(Buffer.byteLength(body))]], body);
}
