// Helpers shared by the usage_*.test.mjs files: the record's shape, a gateway wired to webhook
// receivers, SSE stream comparison, /metrics sums, the `llmproxy usage` CLI, and a bounded
// concurrency pool for load.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { backendEntry } from './config.mjs';
import { httpRequest, sseData } from './http.mjs';
import { runGatewayCli, startGateway } from './procs.mjs';

// The seed project's webhook fields, in its order and with its JSON types.
export const SEED_KEYS = [
  'request_id',
  'user_id',
  'api_key',
  'model',
  'prompt_tokens',
  'completion_tokens',
  'total_tokens',
  'is_stream',
  'endpoint',
  'timestamp',
  'backend_url',
];
// The additions, in order; then cached_tokens and reasoning_tokens only when the backend reported them.
export const EXTRA_KEYS = ['client_request_id', 'backend', 'status_code', 'duration_ms', 'ttft_ms', 'finish', 'usage_source'];
export const OPTIONAL_KEYS = ['cached_tokens', 'reasoning_tokens'];
export const FINISH_VALUES = ['completed', 'client_disconnected', 'upstream_error', 'timeout'];
export const TIMESTAMP_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/;

const isCount = (v) => Number.isInteger(v) && v >= 0;

// Asserts the record's keys (order included) and the type of every field.
export function assertRecordShape(rec, where = 'record') {
  const ctx = `${where}: ${JSON.stringify(rec)}`;
  assert.ok(rec !== null && typeof rec === 'object' && !Array.isArray(rec), `not an object: ${ctx}`);
  const keys = Object.keys(rec);
  assert.deepEqual(keys.slice(0, SEED_KEYS.length), SEED_KEYS, `the seed's fields first, in order: ${ctx}`);
  const want = [...EXTRA_KEYS, ...OPTIONAL_KEYS.filter((k) => k in rec)];
  assert.deepEqual(keys.slice(SEED_KEYS.length), want, `the added fields, in order: ${ctx}`);
  assert.ok(typeof rec.request_id === 'string' && rec.request_id.length > 0, `request_id: ${ctx}`);
  for (const k of ['user_id', 'api_key', 'model', 'endpoint', 'backend_url', 'backend', 'finish', 'usage_source']) {
    assert.equal(typeof rec[k], 'string', `${k} is a string: ${ctx}`);
  }
  for (const k of ['prompt_tokens', 'completion_tokens', 'total_tokens', 'status_code']) {
    assert.ok(isCount(rec[k]), `${k} is a non-negative integer: ${ctx}`);
  }
  for (const k of OPTIONAL_KEYS) if (k in rec) assert.ok(isCount(rec[k]), `${k} is a non-negative integer: ${ctx}`);
  assert.equal(rec.total_tokens, rec.prompt_tokens + rec.completion_tokens, `total = prompt + completion: ${ctx}`);
  assert.equal(typeof rec.is_stream, 'boolean', `is_stream: ${ctx}`);
  assert.match(rec.timestamp, TIMESTAMP_RE, `timestamp: ${ctx}`);
  assert.ok(rec.client_request_id === null || typeof rec.client_request_id === 'string', `client_request_id: ${ctx}`);
  assert.ok(typeof rec.duration_ms === 'number' && rec.duration_ms >= 0, `duration_ms: ${ctx}`);
  assert.ok(rec.ttft_ms === null || (typeof rec.ttft_ms === 'number' && rec.ttft_ms >= 0), `ttft_ms: ${ctx}`);
  assert.ok(FINISH_VALUES.includes(rec.finish), `finish: ${ctx}`);
  assert.ok(['backend', 'estimated'].includes(rec.usage_source), `usage_source: ${ctx}`);
}

// The seed's usage_hook pointed at `receiver`, with quick retries so outages heal fast in tests.
export function hookConfig(receiver, extra = {}) {
  return { enabled: true, url: `${receiver.url}/usage`, timeout: '2s', retry: 2, max_backoff: '200ms', ...extra };
}

// One entry of usage.sinks.
export function sinkConfig(name, receiver, extra = {}) {
  return { name, url: `${receiver.url}/${name}`, timeout: '2s', retry: 2, max_backoff: '200ms', ...extra };
}

// A gateway in front of `mock` (backend name "mk", any model) whose usage_hook posts to `receiver`
// (none when receiver is null). `hook` extends the hook's keys, `usage` the usage section; any
// other key goes to the gateway config as is.
export function startUsageGateway({ mock, receiver = null, hook = {}, usage, backends, ...rest }) {
  const config = { backends: backends ?? [backendEntry(mock, { name: 'mk' })], ...rest };
  if (receiver) config.usage_hook = hookConfig(receiver, hook);
  config.usage = { tokenize: true, ...(usage ?? {}) };
  return startGateway(config);
}

// ---- SSE streams ----

// The data payloads of a stream: '[DONE]' as is, everything else parsed.
export function streamEvents(text) {
  return sseData(text).map((d) => (d === '[DONE]' ? d : JSON.parse(d)));
}

// For comparing two streams of the mock: `id` and `created` differ per request (a per-thread
// counter and the clock), and an upstream asked for usage marks every chunk `"usage": null`.
export function normalizeEvents(events) {
  return events.map((e) => {
    if (typeof e === 'string') return e;
    const c = structuredClone(e);
    if ('usage' in c && c.usage === null) delete c.usage;
    if (typeof c.id === 'string' && c.id !== '') c.id = '<id>';
    if ('created' in c) c.created = 0;
    return c;
  });
}

// The last usage object a stream carried (vLLM's continuous stats: the last value is the total).
export function lastUsage(events) {
  let u = null;
  for (const e of events) if (typeof e === 'object' && e.usage) u = e.usage;
  return u;
}

// The usage-only chunks (`choices: []` with usage) of a stream.
export function usageOnlyChunks(events) {
  return events.filter((e) => typeof e === 'object' && Array.isArray(e.choices) && e.choices.length === 0 && e.usage);
}

// ---- /metrics ----

export async function scrapeMetrics(gw) {
  const res = await httpRequest(`${gw.url}/metrics`, { timeout: 5_000 });
  assert.equal(res.status, 200, `/metrics answered ${res.status}`);
  return res.text();
}

// Every sample of `name` in an exposition: [{labels: {k: v}, value}].
function samplesOf(text, name) {
  const out = [];
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/.exec(line);
    if (!m || m[1] !== name) continue;
    const labels = {};
    for (const p of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    out.push({ labels, value: Number(m[3]) });
  }
  return out;
}

// Sum of the samples of `name` whose labels include every pair of `labels` (0 when none).
export function metricSum(text, name, labels = {}) {
  let sum = 0;
  for (const s of samplesOf(text, name)) {
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === String(v))) sum += s.value;
  }
  return sum;
}

// The value of the sample of `name` with exactly the label set `labels`; undefined when absent.
export function metricSample(text, name, labels = {}) {
  const want = Object.entries(labels);
  for (const s of samplesOf(text, name)) {
    if (Object.keys(s.labels).length === want.length && want.every(([k, v]) => s.labels[k] === String(v))) return s.value;
  }
  return undefined;
}

// ---- the `llmproxy usage` command ----

export function usageCli(args, { timeout = 20_000 } = {}) {
  return runGatewayCli(['usage', ...args], { timeout });
}

// One JSON document, or JSON lines.
export function parseJsonOutput(text) {
  const t = text.trim();
  try {
    return JSON.parse(t);
  } catch {
    const lines = t.split('\n').filter((l) => l.trim() !== '');
    return lines.map((l) => JSON.parse(l));
  }
}

// Every plain object in `value` with the strings of its context: the string values and the keys
// on the path from the root to it, and its own string values.
export function objectsWithContext(value, context = []) {
  const out = [];
  if (Array.isArray(value)) {
    for (const v of value) out.push(...objectsWithContext(v, context));
  } else if (value !== null && typeof value === 'object') {
    const own = Object.values(value).filter((v) => typeof v === 'string');
    const ctx = [...context, ...own];
    out.push({ object: value, context: ctx });
    for (const [k, v] of Object.entries(value)) {
      if (v !== null && typeof v === 'object') out.push(...objectsWithContext(v, [...ctx, k]));
    }
  }
  return out;
}

// ---- load ----

// Runs fn(item, index) over `items`, at most `limit` at a time; resolves with the results in order.
export async function mapLimit(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

// ---- the usage log on disk ----

// Whether every string of `needles` is in the SQLite file at `dbPath`, read with the sqlite3
// shell (.dump, so the schema does not matter; text columns and blobs alike). Resolves to
// { ok, missing, error }; error is set when sqlite3 could not run.
export function logContains(dbPath, needles) {
  const r = spawnSync('sqlite3', ['-readonly', dbPath, '.dump'], { encoding: 'utf8', timeout: 20_000, maxBuffer: 256 * 1024 * 1024 });
  if (r.error) return { ok: false, missing: needles, error: r.error.message };
  if (r.status !== 0) return { ok: false, missing: needles, error: `sqlite3 exited ${r.status}: ${r.stderr}` };
  const dump = r.stdout;
  const upper = dump.toUpperCase();
  const missing = needles.filter((n) => !dump.includes(n) && !upper.includes(Buffer.from(n).toString('hex').toUpperCase()));
  return { ok: missing.length === 0, missing, error: null };
}
