// The gateway at its own resource limits: out of file descriptors, it answers 503 `overloaded`
// and never blames a backend for it (marking it down would turn a local shortage into an outage
// of every request, long after the shortage ended).
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  startGateway,
  backendEntry,
  gatewayConfig,
  toYaml,
  writeTempFile,
  spawnListening,
  LLMPROXY_BIN,
  connect,
  parseResponse,
  waitUntil,
  httpRequest,
  postJson,
  chatBody,
  gatewaySanitized,
  keepAliveAgent,
} from './lib/harness.mjs';
import { scrapeMetrics, metricSum } from './lib/usage.mjs';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// One client connection, requests sent one after the other, each answer read whole.
async function openConnection(port) {
  const socket = await connect(port);
  let buf = Buffer.alloc(0);
  let waiter = null;
  const settle = () => {
    if (!waiter) return;
    const r = parseResponse(buf);
    if (!r) return;
    buf = buf.subarray(r.consumed);
    const w = waiter;
    waiter = null;
    w.resolve(r);
  };
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    settle();
  });
  socket.on('close', () => waiter?.reject(new Error('connection closed')));
  socket.on('error', () => {});
  return {
    socket,
    send(text) {
      return new Promise((resolve, reject) => {
        waiter = { resolve, reject };
        socket.write(text);
        settle();
      });
    },
  };
}

const get = (path) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`;

test('out of file descriptors: 503 overloaded, the backend is not marked down, and all is well once descriptors are free', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'fd' });
  const config = gatewayConfig({
    server: { workers: 1 },
    // The idle filler connections must outlast the test: a new connection's first byte is
    // bounded by client_header.
    timeouts: { client_header: '5m', keepalive: '5m' },
    health_check: { enabled: true, interval: '100ms', unhealthy_threshold: 1 },
    usage: { enabled: false },
    backends: [backendEntry(mock, { name: 'fd' })],
  });
  const file = writeTempFile('llmproxy.yaml', toYaml(config));
  // `ulimit -n` sets the hard limit too: the gateway cannot raise its way out.
  const LIMIT = 64;
  // Under UBSan (the sanitizer test run), the vptr check probes memory through a pipe, which
  // cannot be made without a descriptor: out of them, it reports sound objects as bad ("memory
  // cannot be printed"), and suppressions do not reach that report. For this process only, UBSan
  // reports without ending it; ASan stays as strict.
  const ubsan = [process.env.UBSAN_OPTIONS, 'halt_on_error=0'].filter(Boolean).join(':');
  const gw = await spawnListening('llmproxy', '/bin/bash', ['-c', `ulimit -n ${LIMIT} && exec "$0" --config "$1"`, LLMPROXY_BIN, file], {
    env: { UBSAN_OPTIONS: ubsan },
  });
  // Logged at start, on stderr, which may arrive after the listening line on stdout.
  await waitUntil(() => /open-file limit 64 \(hard limit 64\) is below/.test(gw.stdout + gw.stderr), {
    timeout: 10_000,
    what: 'the warning about the open-file limit',
  }).catch((err) => {
    throw new Error(`${err.message}\n${gw.describe()}`);
  });
  await waitUntil(async () => (await httpRequest(`${gw.url}/ready`)).status === 200, { timeout: 10_000, what: 'a passed health check' });
  // A kept-alive client connection, opened first, with no request sent upstream yet: its chat
  // request will need a new upstream connection.
  const a = await openConnection(gw.port);
  assert.equal((await a.send(get('/health'))).status, 200);
  const backendState = async () => JSON.parse((await a.send(get('/admin/backends'))).body.toString()).backends[0];
  const healthRound = async () => {
    const since = (await backendState()).last_check;
    await waitUntil(async () => (await backendState()).last_check > since, { timeout: 10_000, what: 'a health check round' });
  };
  // Connections that take every descriptor left. A health check holds one for a moment: the
  // gateway is at its limit when it still is after a round of checks, which then fail to open a
  // socket at all.
  const fillers = [];
  // Descriptors below the limit in use (one the process inherited may lie above it).
  const openFds = () => readdirSync(`/proc/${gw.pid}/fd`).filter((fd) => Number(fd) < LIMIT).length;
  const fillDeadline = Date.now() + 30_000; // the loop's own bound: it must not outlive the test
  for (;;) {
    if (Date.now() > fillDeadline) throw new Error(`the gateway was not held at ${LIMIT} descriptors within 30 s (${openFds()} open)`);
    const n = openFds();
    if (n >= LIMIT) {
      await healthRound();
      if (openFds() >= LIMIT) break;
      continue;
    }
    fillers.push(await connect(gw.port));
    await waitUntil(() => openFds() > n, { timeout: 10_000, what: 'the connection accepted' });
  }
  await healthRound();
  await healthRound();
  // One more client: it waits in the listen backlog, and the failed accept is logged.
  fillers.push(await connect(gw.port));
  await waitUntil(() => /cannot accept a client connection: Too many open files \(open-file limit 64\): new connections wait/.test(gw.stderr + gw.stdout), {
    timeout: 10_000,
    what: 'the failed accept logged',
  });
  const body = JSON.stringify(chatBody('m1'));
  const chat = `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
  const refused = await a.send(chat);
  assert.equal(refused.status, 503, refused.body.toString());
  const err = JSON.parse(refused.body.toString()).error;
  assert.equal(err.code, 'overloaded');
  assert.equal(err.type, 'server_error');
  assert.match(err.message, /Too many open files/);
  assert.equal(refused.headers['retry-after']?.[0], '1');
  // The health checks that ran meanwhile could not open a socket either: no verdict on the backend.
  const state = await backendState();
  assert.equal(state.healthy, true, `the backend was marked down: ${JSON.stringify(state)}`);
  assert.equal(state.consecutive_failures, 0);
  assert.match(gw.stderr + gw.stdout, /cannot open a socket to a backend: Too many open files \(open-file limit 64\)/);

  for (const s of fillers) s.destroy();
  a.socket.destroy();
  await waitUntil(() => openFds() < LIMIT - 8, { timeout: 10_000, what: 'descriptors freed' });
  const ok = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(ok.status, 200, ok.text());
});


test('a soft open-file limit below what max_connections needs is raised towards the hard limit at start', { timeout: 30_000 }, async (t) => {
  const hardLimit = spawnSync('/bin/bash', ['-c', 'ulimit -H -n'], { encoding: 'utf8' }).stdout.trim();
  if (hardLimit !== 'unlimited' && Number(hardLimit) <= 256) {
    t.skip(`the hard open-file limit here is ${hardLimit}: nothing to raise to`);
    return;
  }
  const mock = await startMock({ name: 'fdsoft' });
  const config = gatewayConfig({ server: { workers: 1, max_connections: 1000 }, usage: { enabled: false }, backends: [backendEntry(mock, { name: 'fdsoft' })] });
  const file = writeTempFile('llmproxy.yaml', toYaml(config));
  // systemd's default soft limit is 1024; here a lower one, with the hard limit left as it is.
  const gw = await spawnListening('llmproxy', '/bin/bash', ['-c', 'ulimit -S -n 256 && exec "$0" --config "$1"', LLMPROXY_BIN, file]);
  const limits = readFileSync(`/proc/${gw.pid}/limits`, 'utf8');
  const [soft, hard] = /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(limits).slice(1);
  const raised = new RegExp(`raised the open-file limit from 256 to ${soft}`);
  await waitUntil(() => raised.test(gw.stdout + gw.stderr), { timeout: 10_000, what: 'the note on the raised open-file limit' }).catch((err) => {
    throw new Error(`${err.message}\n${gw.describe()}`);
  });
  // 2 per connection, the idle pool (64 per backend and worker) and 64 for the rest.
  const need = 2 * 1000 + 64 + 64;
  assert.equal(Number(soft), hard === 'unlimited' ? need : Math.min(need, Number(hard)));
  const ok = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(ok.status, 200);
});

// A JSON chat body of exactly n bytes.
function chatOfSize(n) {
  const head = '{"model":"m1","messages":[{"role":"user","content":"';
  const tail = '"}]}';
  return Buffer.from(head + 'a'.repeat(n - head.length - tail.length) + tail);
}

test('server.max_body_memory bounds request body memory held at once, counted as bodies arrive: past it 503 overloaded', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'bodies' });
  const gw = await startGateway({
    server: { max_body_size: '1MiB', max_body_memory: '3584KiB' },
    timeouts: { client_header: '5m' },
    backends: [backendEntry(mock, { name: 'bodies' })],
  });
  const SIZE = 1_000_000;
  const body = chatOfSize(SIZE);
  const head = `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${SIZE}\r\n\r\n`;
  const held = async () => metricSum(await scrapeMetrics(gw), 'llmproxy_request_body_bytes');
  // A header announcing a body, and its first byte, hold no more than one read's room: announcing
  // costs nothing (Beast reserves the announced length; the gateway gives that back at once).
  const announcers = [];
  for (let i = 0; i < 40; i++) {
    const c = await openConnection(gw.port);
    c.socket.write(head + '{');
    announcers.push(c);
  }
  await waitUntil(async () => (await held()) >= 40 * 64 * 1024, { timeout: 10_000, what: 'the announced bodies counted' });
  assert.ok((await held()) <= 40 * (64 * 1024 + 128), `40 announced bodies hold ${await held()} bytes`);
  for (const c of announcers) c.socket.destroy();
  await waitUntil(async () => (await held()) === 0, { timeout: 10_000, what: 'their room given back' });
  // Three uploads all but done: their bodies are held whole.
  const uploads = [];
  for (let i = 0; i < 3; i++) {
    const c = await openConnection(gw.port);
    c.socket.write(Buffer.concat([Buffer.from(head), body.subarray(0, SIZE - 1)]));
    uploads.push(c);
  }
  await waitUntil(async () => (await held()) >= 3 * SIZE, { timeout: 15_000, what: 'three bodies held' });
  // A fourth body passes 3.5 MiB as it arrives: refused then, the rest of it unread.
  const fourth = await openConnection(gw.port);
  const refused = await fourth.send(Buffer.concat([Buffer.from(head), body.subarray(0, SIZE - 1)]));
  assert.equal(refused.status, 503);
  const err = JSON.parse(refused.body.toString()).error;
  assert.equal(err.code, 'overloaded');
  assert.match(err.message, /server\.max_body_memory/);
  assert.equal(refused.headers['retry-after']?.[0], '1');
  assert.equal(refused.headers.connection?.[0], 'close');
  // A chunked body is counted as it grows, the same way.
  const chunked = await openConnection(gw.port);
  const piece = Buffer.alloc(64 * 1024, 'a');
  const chunks = [Buffer.from('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n')];
  for (let i = 0; i < 15; i++) chunks.push(Buffer.from(`${piece.length.toString(16)}\r\n`), piece, Buffer.from('\r\n'));
  const refusedChunked = await chunked.send(Buffer.concat(chunks));
  assert.equal(refusedChunked.status, 503);
  assert.equal(JSON.parse(refusedChunked.body.toString()).error.code, 'overloaded');
  // The uploads finish and are answered; their memory is given back for the next.
  for (const c of uploads) assert.equal((await c.send(body.subarray(SIZE - 1))).status, 200);
  await waitUntil(async () => (await held()) === 0, { timeout: 10_000, what: 'the bodies given back' });
  const ok = await postJson(gw.url, '/v1/chat/completions', JSON.parse(body.toString()));
  assert.equal(ok.status, 200, ok.text().slice(0, 200));
});

test('after a burst of large bodies the memory is given back, and large bodies cost no page faults per request', { timeout: 90_000, skip: gatewaySanitized() && 'AddressSanitizer replaces the glibc heap this is about' }, async () => {
  const mock = await startMock({ name: 'burst' });
  const gw = await startGateway({
    server: { workers: 1, max_body_size: '8MiB' },
    timeouts: { client_header: '5m' },
    backends: [backendEntry(mock, { name: 'burst' })],
  });
  const status = () => readFileSync(`/proc/${gw.pid}/status`, 'utf8');
  const rssMiB = () => Number(/VmRSS:\s+(\d+)/.exec(status())[1]) / 1024;
  const minflt = () => Number(readFileSync(`/proc/${gw.pid}/stat`, 'utf8').split(') ')[1].split(' ')[7]);
  const idle = rssMiB();
  const SIZE = 8_000_000;
  const body = JSON.parse(chatOfSize(SIZE).toString());
  // 24 uploads of 8 MB at once: ~190 MB of bodies held together.
  const codes = await Promise.all(Array.from({ length: 24 }, () => postJson(gw.url, '/v1/chat/completions', body, { timeout: 60_000 }).then((r) => r.status)));
  assert.deepEqual([...new Set(codes)], [200]);
  // glibc keeps a freed heap for the next burst; the gateway hands it back once the burst is over.
  await waitUntil(() => rssMiB() < idle + 64, { timeout: 15_000, what: `RSS back near idle (${idle.toFixed(0)} MiB; now ${rssMiB().toFixed(0)} MiB)` });
  // One large body after another, as steady traffic: served from the heap, not from fresh pages
  // (a fixed low mmap threshold faulted in every page of every body: ~2,000 faults per 8 MB body).
  const one = JSON.parse(chatOfSize(1_000_000).toString());
  assert.equal((await postJson(gw.url, '/v1/chat/completions', one)).status, 200);
  const before = minflt();
  for (let i = 0; i < 20; i++) assert.equal((await postJson(gw.url, '/v1/chat/completions', one)).status, 200);
  const perRequest = (minflt() - before) / 20;
  assert.ok(perRequest < 100, `${perRequest} page faults per 1 MB request`);
});

const RFC3339_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

// A log reader that stops reading (a stalled `docker logs`, a suspended `| tee`) fills the pipe
// on stdout. The workers must not wait for it: a worker blocked in write(2) would hold every
// request it serves, and the scrapes, reloads and drain that wait for that worker.
test('a stdout reader that stops reading stalls no request: the access-log lines it cannot take are dropped whole and counted', { timeout: 120_000 }, async () => {
  const mock = await startMock();
  const gw = await startGateway({
    server: { workers: 2, access_log: true },
    backends: [backendEntry(mock)],
    usage: { enabled: false },
  });
  gw.child.stdout.pause(); // node stops reading once its own buffer is full: the pipe fills
  const agent = keepAliveAgent({ maxSockets: 8 });
  // Long model names make long lines: the pipe (64 KiB) and node's buffer fill in a few hundred.
  const model = 'm'.repeat(1000);
  const total = 3000;
  let sent = 0;
  let ok = 0;
  const lane = async () => {
    while (sent < total) {
      sent++;
      const res = await postJson(gw.url, '/v1/chat/completions', chatBody(model), { agent, timeout: 30_000 });
      if (res.status === 200) ok++;
    }
  };
  await Promise.all(Array.from({ length: 8 }, lane));
  assert.equal(ok, total, 'every request answered while nobody read stdout');
  const text = await scrapeMetrics(gw);
  const dropped = metricSum(text, 'llmproxy_log_lines_dropped_total', { log: 'access' });
  assert.ok(dropped > 0, `access-log lines dropped: ${dropped}`);
  assert.equal(metricSum(text, 'llmproxy_log_lines_dropped_total', { log: 'process' }), 0);
  agent.destroy();

  // Reading again: what went out is whole lines from both workers, none cut into another.
  gw.child.stdout.resume();
  gw.signal('SIGTERM');
  await gw.waitExit(30_000);
  const lines = gw.stdout.split('\n').slice(1, -1); // the first may be cut by the test's cap
  let access = 0;
  for (const line of lines) {
    if (line.startsWith('llmproxy: listening on')) continue;
    const entry = JSON.parse(line); // throws on a line another was written into
    assert.match(entry.ts, RFC3339_MS, line.slice(0, 200));
    if (entry.msg === 'access' && entry.path === '/v1/chat/completions') {
      assert.equal(entry.model, model);
      access++;
    }
  }
  assert.ok(access > 0 && access + dropped <= total + 1, `lines read ${access}, dropped ${dropped}`);
  // The process log (stderr) carries the same timestamps.
  const events = gw.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  assert.ok(events.some((e) => e.msg === 'stopped'));
  for (const e of events) assert.match(e.ts, RFC3339_MS, JSON.stringify(e));
});
