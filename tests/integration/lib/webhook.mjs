// A usage-webhook receiver on node:http: records every POST the gateway makes (method, path,
// headers, raw body, parsed JSON, arrival time, what it was answered), answers as each test
// scripts it (a status, a delay, a hang past the sender's timeout, a destroyed socket), and can
// stop and listen again on the same port (a stopped receiver's port refuses connections: an
// outage). Records are the parsed bodies flattened: a batch (JSON array) counts as its elements.
import http from 'node:http';
import crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import { closeServer, listenLoopback, withTimeout } from './util.mjs';

const receivers = new Set();
const entriesBySocket = new WeakMap();

// What one request is answered with. `respond(entry, receiver)` may return (or resolve to):
//   a number                          -> that status, a small JSON body
//   { status, body, headers, delayMs } -> that answer, after delayMs (abandoned if the sender hangs up)
//   { hang: true }                    -> never answered; the entry is 'hung' until the sender gives up
//   { destroy: true }                 -> the socket is destroyed without an answer
//   undefined                         -> 200
function normalizeAction(action) {
  if (action === undefined || action === null) return { status: 200 };
  if (typeof action === 'number') return { status: action };
  return action;
}

function flatten(json) {
  if (json === undefined) return [];
  return Array.isArray(json) ? json : [json];
}

export class WebhookReceiver extends EventEmitter {
  constructor({ respond, name = 'webhook' } = {}) {
    super();
    this.name = name;
    // Reassign at any time to change the behaviour for the requests that follow.
    this.respond = respond ?? null;
    this.requests = [];
    this.port = 0;
    this.server = null;
    this.sockets = new Set();
    this.connectionsAccepted = 0;
    // Every waitFor() adds a listener for its duration; many may wait at once.
    this.setMaxListeners(0);
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  get listening() {
    return this.server !== null;
  }

  async listen(port = this.port) {
    const server = http.createServer({ noDelay: true, keepAliveTimeout: 60_000 }, (req, res) => this.#onRequest(req, res));
    server.on('connection', (socket) => {
      this.connectionsAccepted++;
      this.sockets.add(socket);
      // The requests this connection carried (a keep-alive connection carries many): one
      // listener per connection, not per request.
      entriesBySocket.set(socket, []);
      socket.once('close', () => {
        this.sockets.delete(socket);
        const now = Date.now();
        for (const entry of entriesBySocket.get(socket) ?? []) {
          entry.closedAt = now;
          this.emit('change', entry);
        }
      });
    });
    this.port = await listenLoopback(server, port);
    this.server = server;
    return this;
  }

  // Stops listening and drops every connection, hung requests included: until listen() again,
  // connecting to the port is refused.
  async stop() {
    const server = this.server;
    if (!server) return;
    this.server = null;
    await closeServer(server, this.sockets, `webhook ${this.name}`);
  }

  // Stop, then listen again on the same port.
  async restart() {
    await this.stop();
    await this.listen(this.port);
  }

  #onRequest(req, res) {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const body = Buffer.concat(chunks);
      const text = body.toString('utf8');
      let json;
      let parseError = null;
      try {
        json = JSON.parse(text);
      } catch (err) {
        parseError = err.message;
      }
      const entry = {
        seq: this.requests.length,
        method: req.method,
        url: req.url,
        headers: req.headers,
        rawHeaders: req.rawHeaders,
        body,
        text,
        json,
        parseError,
        records: flatten(json),
        at: Date.now(),
        // 'pending' -> 'answered' (status set) | 'hung' | 'destroyed' | 'abandoned' (sender left
        // during a delay)
        outcome: 'pending',
        status: null,
        answeredAt: null,
        // When the connection carrying this request closed (a hung request: the sender gave up).
        closedAt: null,
      };
      entriesBySocket.get(req.socket)?.push(entry);
      this.requests.push(entry);
      this.emit('request', entry);
      this.emit('change', entry);
      let action;
      try {
        // Without a test's own answer, a body that is not JSON is refused as a real receiver
        // would refuse it: the gateway then records a dead letter instead of counting a delivery.
        const fallback = parseError === null ? undefined : { status: 400, body: JSON.stringify({ error: `not JSON: ${parseError}` }) };
        action = normalizeAction(this.respond ? await this.respond(entry, this) : fallback);
      } catch (err) {
        action = { status: 500, body: JSON.stringify({ error: String(err) }) };
      }
      if (action.destroy) {
        entry.outcome = 'destroyed';
        req.socket.destroy();
        this.emit('change', entry);
        return;
      }
      if (action.hang) {
        entry.outcome = 'hung';
        this.emit('change', entry);
        return;
      }
      if (action.delayMs > 0) {
        const gone = await new Promise((resolve) => {
          const timer = setTimeout(() => resolve(false), action.delayMs);
          res.once('close', () => {
            clearTimeout(timer);
            resolve(true);
          });
        });
        if (gone || res.destroyed) {
          entry.outcome = 'abandoned';
          this.emit('change', entry);
          return;
        }
      }
      const status = action.status ?? 200;
      const payload = action.body ?? JSON.stringify({ status: status < 300 ? 'ok' : 'error' });
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload), ...(action.headers ?? {}) });
      res.end(payload, () => {
        entry.outcome = 'answered';
        entry.status = status;
        entry.answeredAt = Date.now();
        this.emit('change', entry);
      });
    });
  }

  // Requests answered with a 2xx (the sender was told: delivered).
  get acknowledged() {
    return this.requests.filter((e) => e.outcome === 'answered' && e.status >= 200 && e.status < 300);
  }

  // Every record received, batches expanded, in arrival order, whatever the answer was.
  get records() {
    return this.requests.flatMap((e) => e.records);
  }

  // Records in requests answered 2xx.
  get delivered() {
    return this.acknowledged.flatMap((e) => e.records);
  }

  // request_id -> how many times it was delivered (2xx).
  deliveredCounts() {
    const counts = new Map();
    for (const r of this.delivered) counts.set(r?.request_id, (counts.get(r?.request_id) ?? 0) + 1);
    return counts;
  }

  // Delivered records, one per request_id (the first delivery).
  uniqueDelivered() {
    const seen = new Map();
    for (const r of this.delivered) if (!seen.has(r?.request_id)) seen.set(r?.request_id, r);
    return [...seen.values()];
  }

  // Every request carrying a record with this request_id (each attempt of the sender).
  attemptsFor(requestId) {
    return this.requests.filter((e) => e.records.some((r) => r?.request_id === requestId));
  }

  // The delivered record whose client_request_id (the client's X-Request-Id) is `id`.
  deliveredByClientId(id) {
    return this.delivered.find((r) => r?.client_request_id === id);
  }

  // Resolves once `predicate(this)` holds, re-checked on every request and every answer; rejects
  // at the deadline with `what` and a summary of what arrived.
  waitFor(predicate, timeout = 10_000, what = 'a condition') {
    if (predicate(this)) return Promise.resolve(this);
    let listener;
    return withTimeout(
      new Promise((resolve) => {
        listener = () => {
          if (predicate(this)) resolve(this);
        };
        this.on('change', listener);
      }),
      timeout,
      `webhook ${this.name}: ${what} (${this.summary()})`,
    ).finally(() => this.off('change', listener));
  }

  // Waits until `n` distinct request_ids were delivered (2xx).
  waitForDelivered(n, timeout = 10_000) {
    return this.waitFor((r) => r.deliveredCounts().size >= n, timeout, `${n} distinct records delivered`);
  }

  // Waits for the delivered record of the client request `id` and returns it.
  async waitForClientId(id, timeout = 10_000) {
    await this.waitFor((r) => r.deliveredByClientId(id) !== undefined, timeout, `the record of client request ${JSON.stringify(id)}`);
    return this.deliveredByClientId(id);
  }

  summary() {
    const by = {};
    for (const e of this.requests) {
      const k = e.outcome === 'answered' ? `answered ${e.status}` : e.outcome;
      by[k] = (by[k] ?? 0) + 1;
    }
    const unparsed = this.requests.filter((e) => e.parseError !== null).length;
    return `${this.requests.length} requests ${JSON.stringify(by)}, ${unparsed} not JSON, ${this.deliveredCounts().size} distinct delivered, listening: ${this.listening}`;
  }
}

export async function startWebhook({ respond, name, port = 0 } = {}) {
  const r = new WebhookReceiver({ respond, name });
  await r.listen(port);
  receivers.add(r);
  return r;
}

export async function stopAllWebhooks() {
  await Promise.all([...receivers].map((r) => r.stop().catch(() => {})));
  receivers.clear();
}

// Checks X-LLMProxy-Timestamp / X-LLMProxy-Signature of one received request:
// signature = "sha256=" + hex(HMAC-SHA256(secret, "<timestamp>.<raw body>")). Returns
// { ok: true } or { ok: false, reason }.
export function verifySignature(entry, secret, { toleranceSeconds = 300, now = Date.now() } = {}) {
  const ts = entry.headers['x-llmproxy-timestamp'];
  const sig = entry.headers['x-llmproxy-signature'];
  if (typeof ts !== 'string' || !/^\d+$/.test(ts)) return { ok: false, reason: `bad X-LLMProxy-Timestamp ${JSON.stringify(ts)}` };
  if (typeof sig !== 'string' || !sig.startsWith('sha256=')) return { ok: false, reason: `bad X-LLMProxy-Signature ${JSON.stringify(sig)}` };
  if (Math.abs(Number(ts) - now / 1000) > toleranceSeconds) return { ok: false, reason: `timestamp ${ts} is not within ${toleranceSeconds} s of now` };
  const want = crypto.createHmac('sha256', secret).update(`${ts}.`).update(entry.body).digest();
  const got = Buffer.from(sig.slice('sha256='.length), 'hex');
  if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) {
    return { ok: false, reason: `signature ${sig} != sha256=${want.toString('hex')}` };
  }
  return { ok: true };
}
