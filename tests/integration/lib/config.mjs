// Builds gateway configuration files: a JS object rendered as block YAML, written to a temp dir.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const tempDirs = new Set();

export function makeTempDir(prefix = 'llmproxy-it-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDirs() {
  for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}

export function writeTempFile(name, text) {
  const file = path.join(makeTempDir(), name);
  fs.writeFileSync(file, text);
  return file;
}

const PLAIN_SAFE = /^[A-Za-z0-9_][A-Za-z0-9_.\-]*$/;
const YAML_SPECIAL = /^(true|false|yes|no|on|off|null|~|y|n)$/i;

function scalar(value) {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'boolean' || typeof value === 'number') return String(value);
  const s = String(value);
  // Plain when unambiguous (e.g. 1MiB, 200ms, m1); JSON-quoted otherwise (URLs, listen addresses).
  if (PLAIN_SAFE.test(s) && !YAML_SPECIAL.test(s) && !/^[0-9.+-]+$/.test(s)) return s;
  return JSON.stringify(s);
}

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

// Renders nested objects/arrays as block YAML (flow style only for arrays of scalars).
export function toYaml(value, indent = 0) {
  const pad = ' '.repeat(indent);
  let out = '';
  for (const [key, v] of Object.entries(value)) {
    if (v === undefined) continue;
    if (isPlainObject(v)) {
      out += `${pad}${key}:\n${toYaml(v, indent + 2)}`;
    } else if (Array.isArray(v)) {
      if (v.length === 0) {
        out += `${pad}${key}: []\n`;
      } else if (v.every((x) => !isPlainObject(x) && !Array.isArray(x))) {
        out += `${pad}${key}: [${v.map(scalar).join(', ')}]\n`;
      } else {
        out += `${pad}${key}:\n`;
        for (const item of v) {
          const body = toYaml(item, indent + 4);
          out += `${pad}  - ${body.slice(indent + 4)}`;
        }
      }
    } else {
      out += `${pad}${key}: ${scalar(v)}\n`;
    }
  }
  return out;
}

function merge(base, over) {
  const out = { ...base };
  for (const [k, v] of Object.entries(over ?? {})) {
    out[k] = isPlainObject(v) && isPlainObject(base[k]) ? merge(base[k], v) : v;
  }
  return out;
}

// The test default: loopback, ephemeral port, short timeouts, health checks off unless asked for
// (so that backend counters only see the traffic a test sends). The usage log goes to a fresh
// temp dir (never the repository's data/usage.db); a test may override or extend `usage`, or
// pass `usage: undefined` to leave the key out of the file.
export function gatewayConfig(overrides = {}) {
  const base = {
    listen: '127.0.0.1:0',
    server: { workers: 2, max_body_size: '1MiB', drain_timeout: '5s', access_log: false },
    timeouts: { connect: '1s', first_byte: '10s', stream_idle: '10s', client_header: '5s', keepalive: '30s' },
    load_balancing: { strategy: 'weighted_round_robin', max_retries: 1 },
    health_check: {
      enabled: false,
      interval: '200ms',
      path: '/health',
      timeout: '500ms',
      unhealthy_threshold: 2,
      healthy_threshold: 1,
    },
    backends: [],
    // /tokenize calls off by default so that backend request counts are the test's own traffic;
    // the usage tests turn it on (startUsageGateway).
    usage: { log_path: path.join(makeTempDir('llmproxy-usage-'), 'usage.db'), tokenize: false },
  };
  return merge(base, overrides);
}

// A backend entry for anything with a `url` (a mock process or a TestBackend).
export function backendEntry(target, { weight = 1, name, models } = {}) {
  const entry = { url: typeof target === 'string' ? target : target.url, weight };
  if (name !== undefined) entry.name = name;
  if (models !== undefined) entry.models = models;
  return entry;
}
