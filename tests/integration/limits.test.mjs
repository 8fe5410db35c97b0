// The gateway at its own resource limits: out of file descriptors, it answers 503 `overloaded`
// and never blames a backend for it (marking it down would turn a local shortage into an outage
// of every request, long after the shortage ended).
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
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
} from './lib/harness.mjs';

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
    health_check: { enabled: true, interval: '100ms', unhealthy_threshold: 1 },
    usage: { enabled: false },
    backends: [backendEntry(mock, { name: 'fd' })],
  });
  const file = writeTempFile('llmproxy.yaml', toYaml(config));
  // `ulimit -n` sets the hard limit too: the gateway cannot raise its way out.
  const LIMIT = 64;
  const gw = await spawnListening('llmproxy', '/bin/bash', ['-c', `ulimit -n ${LIMIT} && exec "$0" --config "$1"`, LLMPROXY_BIN, file]);
  assert.match(gw.stdout + gw.stderr, /open-file limit 64 \(hard limit 64\) is below/);
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
  for (;;) {
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


test('a soft open-file limit below what max_connections needs is raised towards the hard limit at start', { timeout: 30_000 }, async () => {
  const mock = await startMock({ name: 'fdsoft' });
  const config = gatewayConfig({ server: { workers: 1, max_connections: 1000 }, usage: { enabled: false }, backends: [backendEntry(mock, { name: 'fdsoft' })] });
  const file = writeTempFile('llmproxy.yaml', toYaml(config));
  // systemd's default soft limit is 1024; here a lower one, with the hard limit left as it is.
  const gw = await spawnListening('llmproxy', '/bin/bash', ['-c', 'ulimit -S -n 256 && exec "$0" --config "$1"', LLMPROXY_BIN, file]);
  const limits = readFileSync(`/proc/${gw.pid}/limits`, 'utf8');
  const [soft, hard] = /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(limits).slice(1);
  assert.match(gw.stdout + gw.stderr, new RegExp(`raised the open-file limit from 256 to ${soft}`));
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

test('server.max_body_memory bounds all request bodies held at once: past it 503 overloaded, until bodies are sent on', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'bodies' });
  const gw = await startGateway({
    server: { max_body_size: '1MiB', max_body_memory: '3584KiB' },
    backends: [backendEntry(mock, { name: 'bodies' })],
  });
  const SIZE = 1_000_000;
  const body = chatOfSize(SIZE);
  const head = (extra = '') => `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${SIZE}\r\nExpect: 100-continue\r\n${extra}\r\n`;
  // Three uploads under way: the gateway has taken their bodies' memory once it says 100 Continue.
  const held = [];
  for (let i = 0; i < 3; i++) {
    const c = await openConnection(gw.port);
    const interim = await c.send(head());
    assert.equal(interim.status, 100);
    c.socket.write(body.subarray(0, SIZE / 2));
    held.push(c);
  }
  // A fourth would pass 3.5 MiB: refused at its header, before a byte of body is read.
  const fourth = await openConnection(gw.port);
  const refused = await fourth.send(head());
  assert.equal(refused.status, 503);
  const err = JSON.parse(refused.body.toString()).error;
  assert.equal(err.code, 'overloaded');
  assert.match(err.message, /server\.max_body_memory/);
  assert.equal(refused.headers['retry-after']?.[0], '1');
  assert.equal(refused.headers.connection?.[0], 'close');
  // A chunked body is counted as it grows: refused once it passes what is left.
  const chunked = await openConnection(gw.port);
  const piece = Buffer.alloc(64 * 1024, 'a');
  const chunkedHead = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n';
  const chunks = [chunkedHead, ...Array.from({ length: 15 }, () => Buffer.concat([Buffer.from(`${piece.length.toString(16)}\r\n`), piece, Buffer.from('\r\n')]))];
  const refusedChunked = await chunked.send(Buffer.concat(chunks.map((c) => Buffer.from(c))));
  assert.equal(refusedChunked.status, 503);
  assert.equal(JSON.parse(refusedChunked.body.toString()).error.code, 'overloaded');
  // The held uploads finish and are answered; their memory is free again for the next.
  for (const c of held) {
    const done = c.send(body.subarray(SIZE / 2));
    assert.equal((await done).status, 200);
  }
  const after = await openConnection(gw.port);
  assert.equal((await after.send(head())).status, 100);
  const ok = await after.send(body);
  assert.equal(ok.status, 200, ok.body.toString().slice(0, 200));
  assert.equal(mock.running, true);
});
