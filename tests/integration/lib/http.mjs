// HTTP clients for the tests: a node:http helper for ordinary requests, and a raw node:net client
// for exact bytes (hop-by-hop headers, oversized bodies, hang-ups).
import http from 'node:http';
import net from 'node:net';
import { EventEmitter } from 'node:events';
import { withTimeout } from './util.mjs';

const openSockets = new Set();
const openAgents = new Set();

export function track(socket) {
  if (openSockets.has(socket)) return socket;
  openSockets.add(socket);
  socket.once('close', () => openSockets.delete(socket));
  return socket;
}

export function keepAliveAgent(options = {}) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1, ...options });
  openAgents.add(agent);
  return agent;
}

export function destroyClients() {
  for (const s of openSockets) s.destroy();
  openSockets.clear();
  for (const a of openAgents) a.destroy();
  openAgents.clear();
}

class Response {
  constructor(status, headers, rawHeaders, body) {
    this.status = status;
    this.headers = headers;
    this.rawHeaders = rawHeaders;
    this.body = body;
  }
  text() {
    return this.body.toString('utf8');
  }
  json() {
    return JSON.parse(this.text());
  }
}

// One request with node:http; resolves with the whole response. `agent: false` (the default)
// means a fresh connection, closed afterwards.
export function httpRequest(url, { method = 'GET', headers = {}, body, agent = false, timeout = 15_000 } = {}) {
  const u = new URL(url);
  // Like curl and the SDKs: a known body goes with Content-Length, not chunked.
  const names = Object.keys(headers).map((k) => k.toLowerCase());
  if (body !== undefined && !names.includes('content-length') && !names.includes('transfer-encoding')) {
    headers = { ...headers, 'content-length': Buffer.byteLength(body) };
  }
  return withTimeout(
    new Promise((resolve, reject) => {
      const req = http.request(
        { host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port, path: u.pathname + u.search, method, headers, agent },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('end', () => resolve(new Response(res.statusCode, res.headers, res.rawHeaders, Buffer.concat(chunks))));
          res.on('error', reject);
          res.on('aborted', () => reject(new Error('response aborted')));
        },
      );
      req.on('socket', (s) => track(s));
      req.on('error', reject);
      req.setTimeout(timeout, () => req.destroy(new Error(`no activity for ${timeout} ms on ${method} ${url}`)));
      if (body !== undefined) req.write(body);
      req.end();
    }),
    timeout + 1_000,
    `${method} ${url}`,
  );
}

export function postJson(baseUrl, path, payload, { headers = {}, agent, timeout } = {}) {
  const body = typeof payload === 'string' || Buffer.isBuffer(payload) ? payload : JSON.stringify(payload);
  return httpRequest(baseUrl + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body,
    agent,
    timeout,
  });
}

export function chatBody(model = 'm1', extra = {}) {
  return { model, messages: [{ role: 'user', content: 'Hello' }], ...extra };
}

// Starts a request and hands back the live response (for streams): resolves on the response
// headers with {req, res, socket}. The caller consumes `res` and must destroy it when done.
export function openStream(url, { method = 'POST', headers = {}, body, timeout = 15_000 } = {}) {
  const u = new URL(url);
  return withTimeout(
    new Promise((resolve, reject) => {
      const req = http.request(
        { host: u.hostname, port: u.port, path: u.pathname + u.search, method, headers, agent: false },
        (res) => resolve({ req, res, socket: req.socket }),
      );
      req.on('socket', (s) => track(s));
      req.on('error', reject);
      if (body !== undefined) req.write(body);
      req.end();
    }),
    timeout,
    `response headers of ${method} ${url}`,
  );
}

// Reads a response body to its end with a deadline.
export function readAll(res, timeout = 15_000) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve(Buffer.concat(chunks)));
      res.on('error', reject);
      res.on('aborted', () => reject(new Error('response aborted before its end')));
      res.on('close', () => {
        if (!res.complete) reject(new Error('connection closed before the response ended'));
      });
    }),
    timeout,
    'the end of the response body',
  );
}

// ---- raw HTTP/1.1 over node:net ----

function indexOfCrlf(buf, from) {
  return buf.indexOf('\r\n', from, 'latin1');
}

// Parses one HTTP/1.1 response from `buf`. Returns null while incomplete. `atEof` completes a
// close-delimited body.
export function parseResponse(buf, atEof = false) {
  const headEnd = buf.indexOf('\r\n\r\n', 0, 'latin1');
  if (headEnd < 0) return null;
  const head = buf.subarray(0, headEnd).toString('latin1');
  const [statusLine, ...lines] = head.split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(statusLine);
  if (!m) throw new Error(`bad status line: ${JSON.stringify(statusLine)}`);
  const status = Number(m[1]);
  const headers = {};
  const headerList = [];
  for (const line of lines) {
    const i = line.indexOf(':');
    const name = line.slice(0, i).trim().toLowerCase();
    const value = line.slice(i + 1).trim();
    headerList.push([name, value]);
    (headers[name] ??= []).push(value);
  }
  let pos = headEnd + 4;
  const te = (headers['transfer-encoding'] ?? []).join(',').toLowerCase();
  const noBody = status === 204 || status === 304 || (status >= 100 && status < 200);
  let body;
  if (noBody) {
    body = Buffer.alloc(0);
  } else if (te.includes('chunked')) {
    const parts = [];
    for (;;) {
      const lineEnd = indexOfCrlf(buf, pos);
      if (lineEnd < 0) return null;
      const size = parseInt(buf.subarray(pos, lineEnd).toString('latin1').split(';')[0], 16);
      if (Number.isNaN(size)) throw new Error('bad chunk size');
      pos = lineEnd + 2;
      if (size === 0) {
        // Trailers (normally none) end with an empty line.
        for (;;) {
          const e = indexOfCrlf(buf, pos);
          if (e < 0) return null;
          const empty = e === pos;
          pos = e + 2;
          if (empty) break;
        }
        break;
      }
      if (buf.length < pos + size + 2) return null;
      parts.push(buf.subarray(pos, pos + size));
      pos += size + 2;
    }
    body = Buffer.concat(parts);
  } else if (headers['content-length']) {
    const len = Number(headers['content-length'][0]);
    if (buf.length < pos + len) return null;
    body = buf.subarray(pos, pos + len);
    pos += len;
  } else {
    if (!atEof) return null;
    body = buf.subarray(pos);
    pos = buf.length;
  }
  return { status, headers, headerList, body, consumed: pos, raw: buf.subarray(0, pos) };
}

export function connect(port, host = '127.0.0.1', timeout = 5_000) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const s = track(net.connect({ port, host }));
      s.once('connect', () => {
        s.off('error', reject);
        resolve(s);
      });
      s.once('error', reject);
    }),
    timeout,
    `TCP connect to ${host}:${port}`,
  );
}

// Sends `bytes` on a new connection and resolves with the first complete response (or what came
// before the peer closed). Write errors (the peer refusing the rest of a large body) are ignored:
// the response that was sent before is what the test checks.
export async function rawExchange(port, bytes, { timeout = 15_000, host = '127.0.0.1' } = {}) {
  const socket = await connect(port, host);
  try {
    return await withTimeout(
      new Promise((resolve, reject) => {
        let buf = Buffer.alloc(0);
        let done = false;
        const finish = (atEof) => {
          if (done) return;
          let r = null;
          try {
            r = parseResponse(buf, atEof);
          } catch (err) {
            done = true;
            reject(err);
            return;
          }
          if (r) {
            done = true;
            resolve(r);
          } else if (atEof) {
            done = true;
            reject(new Error(`connection closed after ${buf.length} bytes without a complete response: ${JSON.stringify(buf.toString('latin1').slice(0, 300))}`));
          }
        };
        socket.on('data', (d) => {
          buf = Buffer.concat([buf, d]);
          finish(false);
        });
        socket.on('end', () => finish(true));
        socket.on('close', () => finish(true));
        socket.on('error', () => finish(true));
        socket.write(bytes, () => {});
      }),
      timeout,
      'a raw HTTP response',
    );
  } finally {
    socket.destroy();
  }
}

// Builds request bytes: rawRequest('POST', '/v1/x', [['Host','a'], ...], body).
export function rawRequest(method, path, headerList, body) {
  let head = `${method} ${path} HTTP/1.1\r\n`;
  for (const [k, v] of headerList) head += `${k}: ${v}\r\n`;
  head += '\r\n';
  return body === undefined ? Buffer.from(head, 'latin1') : Buffer.concat([Buffer.from(head, 'latin1'), Buffer.from(body)]);
}

// Splits an SSE text into events (blank-line separated, any line ending); keeps only complete ones.
export function sseEvents(text) {
  const normalized = text.replace(/\r\n|\r/g, '\n');
  const parts = normalized.split('\n\n');
  parts.pop(); // incomplete tail (or '' after the last separator)
  return parts.filter((p) => p.length > 0);
}

// The `data:` payloads of the events in `text`.
export function sseData(text) {
  const out = [];
  for (const ev of sseEvents(text)) {
    const data = ev
      .split('\n')
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).replace(/^ /, ''));
    if (data.length) out.push(data.join('\n'));
  }
  return out;
}

// Concatenated delta contents of an OpenAI chat stream, plus whether it ended with [DONE].
export function chatStreamContent(text) {
  let content = '';
  let done = false;
  for (const d of sseData(text)) {
    if (d === '[DONE]') {
      done = true;
      continue;
    }
    const j = JSON.parse(d);
    for (const c of j.choices ?? []) {
      if (c.delta?.content) content += c.delta.content;
      if (typeof c.text === 'string') content += c.text;
    }
  }
  return { content, done };
}

// Asserts the OpenAI error shape; returns the parsed error object.
export function openAIError(res) {
  const ct = String(res.headers['content-type'] ?? '');
  if (!/application\/json/i.test(ct)) throw new Error(`content-type is ${JSON.stringify(ct)}, want application/json`);
  const j = JSON.parse(res.body.toString('utf8'));
  const e = j?.error;
  if (!e || typeof e !== 'object') throw new Error(`no error object in ${res.body}`);
  if (typeof e.message !== 'string' || e.message.length === 0) throw new Error(`error.message empty in ${res.body}`);
  if (typeof e.type !== 'string' || e.type.length === 0) throw new Error(`error.type missing in ${res.body}`);
  if (!('code' in e)) throw new Error(`error.code missing in ${res.body}`);
  if (!('param' in e)) throw new Error(`error.param missing in ${res.body}`);
  return e;
}

// Incremental decoder of a chunked body: calls onData with body bytes as soon as they arrive
// (also the first bytes of a chunk that is not complete yet), and onEnd after the last chunk.
export class ChunkedDecoder {
  constructor(onData, onEnd) {
    this.onData = onData;
    this.onEnd = onEnd;
    this.state = 'size';
    this.line = '';
    this.remaining = 0;
    this.crlfLeft = 0;
  }
  push(buf) {
    let i = 0;
    while (i < buf.length && this.state !== 'done') {
      if (this.state === 'size' || this.state === 'trailer') {
        const b = buf[i++];
        if (b === 0x0a) {
          if (this.state === 'size') {
            const size = parseInt(this.line.split(';')[0].trim(), 16);
            if (Number.isNaN(size)) throw new Error(`bad chunk size line ${JSON.stringify(this.line)}`);
            if (size === 0) this.state = 'trailer';
            else {
              this.remaining = size;
              this.state = 'data';
            }
          } else if (this.line === '') {
            this.state = 'done';
            this.onEnd();
          }
          this.line = '';
        } else if (b !== 0x0d) {
          this.line += String.fromCharCode(b);
        }
      } else if (this.state === 'data') {
        const n = Math.min(this.remaining, buf.length - i);
        this.onData(buf.subarray(i, i + n));
        i += n;
        this.remaining -= n;
        if (this.remaining === 0) {
          this.state = 'crlf';
          this.crlfLeft = 2;
        }
      } else {
        i++;
        if (--this.crlfLeft === 0) this.state = 'size';
      }
    }
  }
}

// A raw client request whose response is consumed incrementally. Events: 'head' ({status,
// headers, head}), 'body' (Buffer of body bytes, as they arrive), 'end', 'close', 'error'.
export class RawStream extends EventEmitter {
  constructor(socket) {
    super();
    this.socket = socket;
    this.head = null;
    this.body = Buffer.alloc(0);
    this.ended = false;
    let pre = Buffer.alloc(0);
    let decoder = null;
    let contentLength = -1;
    const deliver = (b) => {
      if (b.length === 0) return;
      this.body = Buffer.concat([this.body, b]);
      this.emit('body', b);
      if (contentLength >= 0 && this.body.length >= contentLength) this.#end();
    };
    socket.on('data', (d) => {
      if (this.ended) return;
      if (!this.head) {
        pre = Buffer.concat([pre, d]);
        const e = pre.indexOf('\r\n\r\n');
        if (e < 0) return;
        const headText = pre.subarray(0, e).toString('latin1');
        const [statusLine, ...lines] = headText.split('\r\n');
        const headers = {};
        for (const l of lines) {
          const i = l.indexOf(':');
          headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
        }
        this.head = { status: Number(statusLine.split(' ')[1]), headers, text: headText };
        if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
          decoder = new ChunkedDecoder(deliver, () => this.#end());
        } else if (headers['content-length'] !== undefined) {
          contentLength = Number(headers['content-length']);
        }
        this.emit('head', this.head);
        d = pre.subarray(e + 4);
        if (contentLength === 0) this.#end();
      }
      if (decoder) decoder.push(d);
      else deliver(d);
    });
    socket.on('end', () => {
      if (!decoder && contentLength < 0 && this.head) this.#end();
    });
    socket.on('error', (err) => this.emit('error', err));
    socket.on('close', () => this.emit('close'));
  }
  #end() {
    if (this.ended) return;
    this.ended = true;
    this.emit('end');
  }
  get text() {
    return this.body.toString('utf8');
  }
  // Resolves once `predicate(this)` holds, checked on every event; rejects on close or deadline.
  until(predicate, timeout, what) {
    if (predicate(this)) return Promise.resolve(this);
    let onEvent;
    let onClose;
    return withTimeout(
      new Promise((resolve, reject) => {
        onEvent = () => {
          if (predicate(this)) resolve(this);
        };
        onClose = () => {
          if (predicate(this)) resolve(this);
          else reject(new Error(`connection closed before ${what} (status ${this.head?.status}, ${this.body.length} body bytes: ${JSON.stringify(this.text.slice(-300))})`));
        };
        this.on('head', onEvent);
        this.on('body', onEvent);
        this.on('end', onEvent);
        this.on('close', onClose);
      }),
      timeout,
      what,
    ).finally(() => {
      this.off('head', onEvent);
      this.off('body', onEvent);
      this.off('end', onEvent);
      this.off('close', onClose);
    });
  }
  destroy() {
    this.socket.destroy();
  }
}

export async function openRawStream(port, requestBytes, { host = '127.0.0.1' } = {}) {
  const socket = await connect(port, host);
  const stream = new RawStream(socket);
  socket.write(requestBytes);
  return stream;
}

// The bytes of a JSON POST, for raw clients.
export function jsonPostBytes(port, path, payload, extraHeaders = []) {
  const body = typeof payload === 'string' ? payload : JSON.stringify(payload);
  return rawRequest('POST', path, [
    ['Host', `127.0.0.1:${port}`],
    ['Content-Type', 'application/json'],
    ['Content-Length', String(Buffer.byteLength(body))],
    ...extraHeaders,
  ], body);
}

// Who answered `n` sequential chat requests (model m1), by the mock's X-Mock-Backend header:
// {a: 3, b: 1, 'HTTP 502': 1}.
export async function tally(gw, n, agent = false) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { agent });
    const key = res.status === 200 ? res.headers['x-mock-backend'] : `HTTP ${res.status}`;
    out[key] = (out[key] ?? 0) + 1;
  }
  return out;
}
