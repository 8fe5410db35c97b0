// Spawns the gateway and the mock backend, waits for their "listening on" line (with a deadline),
// and makes sure that no process outlives its test file.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gatewayConfig, toYaml, writeTempFile } from './config.mjs';
import { httpRequest } from './http.mjs';
import { withTimeout } from './util.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const SUITE_DIR = path.resolve(HERE, '..');

function resolveBin(envName, fallback) {
  const given = process.env[envName];
  return given ? path.resolve(process.cwd(), given) : path.resolve(SUITE_DIR, fallback);
}

export const LLMPROXY_BIN = resolveBin('LLMPROXY_BIN', '../../build/llmproxy');
export const MOCK_BIN = resolveBin('MOCK_BIN', '../../build/llmproxy-mock');

// Whether the gateway under test is built with AddressSanitizer, whose allocator replaces glibc's
// (a test of glibc's heap behaviour does not apply to it).
export function gatewaySanitized() {
  const r = spawnSync('ldd', [LLMPROXY_BIN], { encoding: 'utf8' });
  return /libasan/.test(r.stdout ?? '');
}

function requireBin(bin, envName) {
  if (!fs.existsSync(bin)) {
    throw new Error(`${bin} does not exist: build it or set ${envName} to the binary's path`);
  }
}

const live = new Set();
const started = [];
let currentTest = '(before any test)'; // see BEFORE_TESTS

// beforeEach hook: remembers which test is running, so a crash report names the test that
// started the process even when the crash is noticed later.
export function noteTest(t) {
  currentTest = t?.name ?? currentTest;
}
const OUTPUT_CAP = 256 * 1024;

// Last resort: if the runner exits with children still alive (a crash in a hook), kill them.
process.on('exit', () => {
  for (const p of live) {
    try {
      p.child.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
});
// The test runner stops a file that outlives --test-timeout with SIGTERM, and scripts/test.sh's
// bound on the whole run stops it the same way; a signal's default action would skip the 'exit'
// hook above and leave this file's gateways and mocks running.
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) {
  process.once(sig, () => process.exit(128 + os.constants.signals[sig]));
}

export class Proc {
  constructor(name, child) {
    this.name = name;
    this.child = child;
    this.stdout = '';
    this.stderr = '';
    this.exitInfo = null;
    // Set when the test itself signals or kills the process: any other exit is a crash.
    this.exitExpected = false;
    this.crashReported = false;
    this.startedIn = currentTest;
    // `running` turns false at 'exit'; `exited` resolves at 'close', which follows once both pipes
    // are drained too, so the output a test reads after the exit is complete.
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        live.delete(this);
      });
      child.once('close', (code, signal) => {
        this.exitInfo ??= { code, signal };
        live.delete(this);
        resolve(this.exitInfo);
      });
    });
    // Keep draining both pipes for the whole life of the process so it never blocks on a write.
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      this.stdout = (this.stdout + d).slice(-OUTPUT_CAP);
    });
    child.stderr.on('data', (d) => {
      this.stderr = (this.stderr + d).slice(-OUTPUT_CAP);
    });
    live.add(this);
    started.push(this);
  }

  get pid() {
    return this.child.pid;
  }

  get running() {
    return this.exitInfo === null;
  }

  signal(sig) {
    this.exitExpected = true;
    if (this.running) this.child.kill(sig);
  }

  // Waits for the process to exit; rejects after `ms`.
  waitExit(ms = 10_000) {
    return withTimeout(this.exited, ms, `${this.name} (pid ${this.pid}) to exit`);
  }

  // Kills (SIGKILL) and waits for the exit: always safe to call, also after the process ended.
  async kill() {
    if (!this.running) return this.exitInfo;
    this.exitExpected = true;
    this.child.kill('SIGKILL');
    return this.waitExit(5_000);
  }

  describe() {
    // A sanitizer report starts with its one-line cause and then a long stack: show it from the
    // start, which a tail of the output would cut off.
    const report = this.stderr.search(/runtime error:|ERROR: (Address|Leak|Thread)Sanitizer/);
    const err = report >= 0 ? this.stderr.slice(report, report + 6000) : this.stderr.slice(-4000);
    return `${this.name} pid ${this.pid}\n--- stdout ---\n${this.stdout.slice(-4000)}\n--- stderr ---\n${err}`;
  }
}

// Spawns `bin args` and resolves once stdout has a line matching `listening on http://HOST:PORT`.
export async function spawnListening(name, bin, args, { timeout = 15_000, env, cwd } = {}) {
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env }, cwd });
  const proc = new Proc(name, child);
  const ready = new Promise((resolve, reject) => {
    let buffered = '';
    const onData = (d) => {
      buffered += d;
      const m = /listening on http:\/\/(\[[^\]]+\]|[^\s:]+):(\d+)/.exec(buffered);
      if (m) {
        child.stdout.off('data', onData);
        resolve(m);
      }
    };
    child.stdout.on('data', onData);
    child.once('error', reject);
    proc.exited.then((info) => reject(new Error(`${name} exited (${JSON.stringify(info)}) before listening\n${proc.describe()}`)));
  });
  let m;
  try {
    m = await withTimeout(ready, timeout, `${name} to print its listening line`);
  } catch (err) {
    proc.crashReported = true;
    await proc.kill().catch(() => {});
    throw new Error(`${err.message}\n${proc.describe()}`);
  }
  const host = m[1].replace(/^\[|\]$/g, '');
  proc.listenHost = host;
  proc.port = Number(m[2]);
  // Wildcard listeners are reached through loopback.
  proc.host = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  proc.url = `http://${proc.host.includes(':') ? `[${proc.host}]` : proc.host}:${proc.port}`;
  return proc;
}

// Starts the gateway with `config` (an object merged into the test defaults, or raw YAML text).
// The process runs in the config file's own temp dir, so relative paths a raw YAML config leaves
// at their defaults (usage.log_path: data/usage.db) never land in the repository.
// `proc.config` is the merged object (null for raw YAML): e.g. proc.config.usage.log_path.
export async function startGateway(config, { timeout } = {}) {
  requireBin(LLMPROXY_BIN, 'LLMPROXY_BIN');
  const merged = typeof config === 'string' ? null : gatewayConfig(config);
  const yaml = merged === null ? config : toYaml(merged);
  const file = writeTempFile('llmproxy.yaml', yaml);
  return spawnGateway(file, yaml, merged, { timeout });
}

// Starts a new gateway process from the config file of `previous` (same usage log, same sinks;
// a new ephemeral listen port when the config says port 0). For restart and crash-recovery tests:
// stop or kill `previous` first.
export async function restartGateway(previous, { timeout } = {}) {
  if (previous.running) throw new Error(`restartGateway: pid ${previous.pid} is still running; stop or kill it first`);
  return spawnGateway(previous.configFile, previous.configText, previous.config, { timeout });
}

async function spawnGateway(file, yaml, merged, { timeout }) {
  const proc = await spawnListening('llmproxy', LLMPROXY_BIN, ['--config', file], { timeout, cwd: path.dirname(file) });
  proc.configFile = file;
  proc.configText = yaml;
  proc.config = merged;
  return proc;
}

// Starts one mock backend process.
export async function startMock({ name, models, flavor, threads = 1, extraArgs = [] } = {}) {
  requireBin(MOCK_BIN, 'MOCK_BIN');
  const args = ['--listen', '127.0.0.1:0'];
  if (name) args.push('--name', name);
  if (models) args.push('--models', models.join(','));
  if (flavor) args.push('--flavor', flavor);
  if (threads) args.push('--threads', String(threads));
  args.push(...extraArgs);
  const proc = await spawnListening(`llmproxy-mock${name ? ` ${name}` : ''}`, MOCK_BIN, args);
  proc.mockName = name;
  return proc;
}

// GET /mock/stats of a mock process: {requests, connections_accepted, connections_open, by_path}.
export async function mockStats(mock) {
  const res = await httpRequest(`${mock.url}/mock/stats`, { timeout: 5_000 });
  if (res.status !== 200) throw new Error(`mock stats: HTTP ${res.status}`);
  return res.json();
}

// Requests a mock saw on one path (0 when it saw none).
export async function mockPathCount(mock, p) {
  const stats = await mockStats(mock);
  return Number(stats.by_path?.[p] ?? 0);
}

// Runs the gateway binary to completion (for --check-config, --version, --help).
export function runGatewayCli(args, { timeout = 15_000 } = {}) {
  requireBin(LLMPROXY_BIN, 'LLMPROXY_BIN');
  const r = spawnSync(LLMPROXY_BIN, args, { encoding: 'utf8', timeout, killSignal: 'SIGKILL' });
  if (r.error) throw r.error;
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

// Throws if a process exited that no test asked to stop (a crash, an abort, a fatal error).
// Each process is reported once; use as an afterEach hook so the failing test is named.
// With `scope: 'test'` only processes of the running test (or of the file's before() hooks) count:
// a process left over from an earlier test is reported by the file's after() hook instead.
const BEFORE_TESTS = '(before any test)';

export function checkNoUnexpectedExits({ scope = 'all' } = {}) {
  const inScope = (p) => scope === 'all' || p.startedIn === currentTest || p.startedIn === BEFORE_TESTS;
  const crashed = started.filter((p) => p.exitInfo && !p.exitExpected && !p.crashReported && inScope(p));
  for (const p of crashed) p.crashReported = true;
  if (crashed.length) {
    const report = crashed
      .map((p) => `${p.name} (started in test "${p.startedIn}") exited unexpectedly (${JSON.stringify(p.exitInfo)})\n${p.describe()}`)
      .join('\n');
    // Also on stderr: node:test drops an afterEach error when the test itself already failed.
    process.stderr.write(`CRASH: ${report}\n`);
    throw new Error(report);
  }
}

export async function killAllProcesses() {
  await Promise.all([...live].map((p) => p.kill().catch(() => {})));
}
