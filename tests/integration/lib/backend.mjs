// A tiny scriptable upstream on node:http: records every request it sees (headers, body, its
// socket), lets each test script the response, and can stop and listen again on the same port.
import fs from 'node:fs';
import http from 'node:http';
import { EventEmitter } from 'node:events';
import { closeServer, listenLoopback, withTimeout } from './util.mjs';

const backends = new Set();
const closedBySocket = new WeakMap();

// One promise per connection (a keep-alive connection carries many requests).
function closedPromise(socket) {
  let p = closedBySocket.get(socket);
  if (!p) {
    p = socket.destroyed ? Promise.resolve() : new Promise((resolve) => socket.once('close', resolve));
    closedBySocket.set(socket, p);
  }
  return p;
}

export function chatCompletionJson(name, model = 'm1') {
  return JSON.stringify({
    id: 'chatcmpl-test',
    object: 'chat.completion',
    created: 1700000000,
    model,
    choices: [{ index: 0, message: { role: 'assistant', content: `hello from ${name}` }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 },
  });
}

export class TestBackend extends EventEmitter {
  constructor(name) {
    super();
    this.name = name;
    this.requests = [];
    this.connectionsAccepted = 0;
    this.sockets = new Set();
    this.port = 0;
    this.healthStatus = 200;
    this.modelProbes = 0;
    // Per-test script for API requests: async (req, res, body, record) => void.
    this.handler = null;
    this.server = null;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  // Requests other than health checks.
  get apiRequests() {
    return this.requests.filter((r) => r.url !== '/health');
  }

  get healthChecks() {
    return this.requests.filter((r) => r.url === '/health').length;
  }

  async listen(port = this.port) {
    const server = http.createServer({ noDelay: true, keepAliveTimeout: 60_000 }, (req, res) => this.#onRequest(req, res));
    server.on('connection', (socket) => {
      this.connectionsAccepted++;
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
    });
    this.port = await listenLoopback(server, port);
    this.server = server;
    return this;
  }

  // Stops listening and drops every open connection (the port is refused until listen() again).
  async stop() {
    const server = this.server;
    if (!server) return;
    this.server = null;
    await closeServer(server, this.sockets, `backend ${this.name}`);
  }

  #onRequest(req, res) {
    // The gateway's model discovery (GET /v1/models with its health checker's User-Agent, also
    // sent when health checks are off): answered here, an empty list, and not counted among the
    // requests, so that they stay the test's own traffic.
    if (req.method === 'GET' && req.url === '/v1/models' && req.headers['user-agent'] === 'llmproxy-health-check') {
      this.modelProbes++;
      req.resume();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"object":"list","data":[]}');
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const socket = req.socket;
      const record = {
        method: req.method,
        url: req.url,
        headers: req.headers,
        rawHeaders: req.rawHeaders,
        body: Buffer.concat(chunks),
        req,
        res,
        socket,
        // Resolves when the connection carrying this request closes.
        socketClosed: closedPromise(socket),
      };
      this.requests.push(record);
      this.emit('request', record);
      res.setHeader('x-mock-backend', this.name);
      try {
        if (req.url === '/health') {
          res.writeHead(this.healthStatus, { 'content-type': 'application/json' });
          res.end(this.healthStatus === 200 ? '{"status":"ok"}' : '{"status":"down"}');
        } else if (this.handler) {
          await this.handler(req, res, record.body, record);
        } else {
          const body = chatCompletionJson(this.name);
          res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
          res.end(body);
        }
      } catch (err) {
        if (!res.headersSent) {
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(String(err));
        } else {
          res.destroy();
        }
      }
    });
  }

  // Resolves with the first request (already seen or future) matching `predicate`.
  waitForRequest(predicate = (r) => r.url !== '/health', timeout = 10_000, what = 'a request') {
    const seen = this.requests.find(predicate);
    if (seen) return Promise.resolve(seen);
    let listener;
    return withTimeout(
      new Promise((resolve) => {
        listener = (r) => {
          if (predicate(r)) resolve(r);
        };
        this.on('request', listener);
      }),
      timeout,
      `backend ${this.name} to see ${what}`,
    ).finally(() => this.off('request', listener));
  }
}

export async function startBackend(name = 'own', { port = 0 } = {}) {
  const b = new TestBackend(name);
  await b.listen(port);
  backends.add(b);
  return b;
}

export async function stopAllBackends() {
  await Promise.all([...backends].map((b) => b.stop().catch(() => {})));
  backends.clear();
}

// A free loopback port with nothing listening on it (bind, read the port, close).
// A loopback port nothing listens on, for a backend that refuses connections. Taken below the
// kernel's ephemeral range: a port from listen(0) could be handed out again at once to the next
// process that binds port 0 (a gateway under test then proxied to itself). Checked free by
// binding it; a port already taken is skipped.
export async function freePort() {
  let low = 32768;
  try {
    low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch {
    // not Linux: the usual range's start
  }
  const span = Math.max(1000, low - 10000);
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = low - 1 - Math.floor(Math.random() * Math.min(span, low - 1025));
    const server = http.createServer();
    const ok = await new Promise((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => resolve(true));
    });
    if (!ok) continue;
    await new Promise((resolve) => server.close(resolve));
    return port;
  }
  throw new Error('no free loopback port below the ephemeral range');
}
