// The command line: --check-config reports every problem with file, line and key path; --version
// and --help; the seed project's config style is accepted and runs.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  cleanup,
  checkProcesses,
  trackTest,
  writeTempFile,
  runGatewayCli,
  startGateway,
  startMock,
  startBackend,
  backendEntry,
  gatewayConfig,
  toYaml,
  httpRequest,
  postJson,
  chatBody,
  waitUntil,
  spawnListening,
  LLMPROXY_BIN,
} from './lib/harness.mjs';
import { spawnSync } from 'node:child_process';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// Parses "FILE:LINE:COL: KEY.PATH: message" lines.
function diagnostics(stderr) {
  const out = [];
  for (const line of stderr.split('\n')) {
    const m = /^(.+?):(\d+):(\d+): (\S+): (.+)$/.exec(line.trim());
    if (m) out.push({ file: m[1], line: Number(m[2]), col: Number(m[3]), key: m[4], message: m[5] });
  }
  return out;
}

// Accepts "backends[0].weight" and the dotted "backends.0.weight" spelling.
function sameKey(a, b) {
  const norm = (k) => k.replace(/\[(\d+)\]/g, '.$1');
  return norm(a) === norm(b);
}

function expectProblems(file, r, expected) {
  assert.notEqual(r.status, 0, `--check-config accepted a bad file\nstderr: ${r.stderr}`);
  const diags = diagnostics(r.stderr);
  for (const { key, line } of expected) {
    const d = diags.find((x) => sameKey(x.key, key));
    assert.ok(d, `no diagnostic for ${key} in:\n${r.stderr}`);
    if (line !== undefined) assert.equal(d.line, line, `${key} reported at line ${d.line}, want ${line}\n${r.stderr}`);
    assert.ok(d.file.endsWith(file.split('/').pop()), `diagnostic names file ${d.file}, want ${file}`);
    assert.ok(d.message.length > 0);
  }
}

const GOOD = `listen: "127.0.0.1:0"
server: { workers: 2, max_body_size: 1MiB, drain_timeout: 5s, access_log: false }
timeouts: { connect: 1s, first_byte: 10s, stream_idle: 10s, client_header: 5s, keepalive: 30s }
load_balancing: { strategy: least_in_flight, max_retries: 1 }
health_check: { enabled: true, interval: 200ms, path: /health, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 1 }
backends:
  - { url: "http://127.0.0.1:9", weight: 5, name: a, models: ["m1"] }
  - url: "http://127.0.0.1:10"
`;

test('--check-config accepts a good file', { timeout: 20_000 }, () => {
  const file = writeTempFile('good.yaml', GOOD);
  const r = runGatewayCli(['--check-config', file]);
  assert.equal(r.status, 0, `stderr: ${r.stderr}`);
});

test('--check-config accepts the generated test config', { timeout: 20_000 }, () => {
  const file = writeTempFile('gen.yaml', toYaml(gatewayConfig({ backends: [backendEntry('http://127.0.0.1:9', { name: 'x', models: ['m1'] })] })));
  const r = runGatewayCli(['--check-config', file]);
  assert.equal(r.status, 0, `stderr: ${r.stderr}`);
});

test('--check-config reports every problem of a bad file with its line and key path', { timeout: 20_000 }, () => {
  const text = [
    'listen: "127.0.0.1:0"', // 1
    'server:', // 2
    '  workers: "many"', // 3  wrong type
    '  bogus_key: 1', // 4  unknown key
    'backends:', // 5
    '  - url: "ftp//not a url"', // 6  bad URL
    '    weight: 0', // 7  weight 0
    '  - url: "http://127.0.0.1:9"', // 8
    '    weight: "heavy"', // 9  wrong type
    'unknown_top: true', // 10 unknown key
  ].join('\n') + '\n';
  const file = writeTempFile('bad.yaml', text);
  const r = runGatewayCli(['--check-config', file]);
  expectProblems(file, r, [
    { key: 'server.workers', line: 3 },
    { key: 'server.bogus_key', line: 4 },
    { key: 'backends[0].url', line: 6 },
    { key: 'backends[0].weight', line: 7 },
    { key: 'backends[1].weight', line: 9 },
    { key: 'unknown_top', line: 10 },
  ]);
});

for (const [what, text, key, line] of [
  ['an unknown key', 'listen: "127.0.0.1:0"\nbackends:\n  - url: "http://127.0.0.1:9"\n    wieght: 3\n', 'backends[0].wieght', 4],
  ['a wrong type', 'listen: "127.0.0.1:0"\nload_balancing:\n  max_retries: [1, 2]\nbackends:\n  - url: "http://127.0.0.1:9"\n', 'load_balancing.max_retries', 3],
  ['a bad URL', 'listen: "127.0.0.1:0"\nbackends:\n  - url: "not-a-url"\n', 'backends[0].url', 3],
  ['weight 0', 'listen: "127.0.0.1:0"\nbackends:\n  - url: "http://127.0.0.1:9"\n    weight: 0\n', 'backends[0].weight', 4],
  ['empty backends', 'listen: "127.0.0.1:0"\nbackends: []\n', 'backends', 2],
  ['a bad duration', 'listen: "127.0.0.1:0"\ntimeouts:\n  connect: soon\nbackends:\n  - url: "http://127.0.0.1:9"\n', 'timeouts.connect', 3],
  ['a bad strategy', 'listen: "127.0.0.1:0"\nload_balancing:\n  strategy: random_guess\nbackends:\n  - url: "http://127.0.0.1:9"\n', 'load_balancing.strategy', 3],
  ['a bad listen address', 'listen: "127.0.0.1:99999"\nbackends:\n  - url: "http://127.0.0.1:9"\n', 'listen', 1],
]) {
  test(`--check-config rejects ${what}`, { timeout: 20_000 }, () => {
    const file = writeTempFile('bad.yaml', text);
    const r = runGatewayCli(['--check-config', file]);
    expectProblems(file, r, [{ key, line }]);
  });
}

test('--check-config rejects a file that does not exist or is not YAML', { timeout: 20_000 }, () => {
  const missing = runGatewayCli(['--check-config', '/nonexistent/llmproxy.yaml']);
  assert.notEqual(missing.status, 0);
  // The reason, not only the failure: a wrong mount path and an unreadable file differ.
  assert.match(missing.stderr, /cannot open the file: No such file or directory/);
  const file = writeTempFile('broken.yaml', 'listen: "127.0.0.1:0"\nbackends: [\n  - url: {\n');
  const broken = runGatewayCli(['--check-config', file]);
  assert.notEqual(broken.status, 0);
  assert.match(broken.stderr, /broken\.yaml/);
});

test('--config with a bad file exits non-zero without listening', { timeout: 20_000 }, () => {
  const file = writeTempFile('bad.yaml', 'listen: "127.0.0.1:0"\nbackends: []\n');
  const r = runGatewayCli(['--config', file]);
  assert.notEqual(r.status, 0);
  assert.doesNotMatch(r.stdout, /listening on/);
  assert.ok(diagnostics(r.stderr).some((d) => d.key === 'backends'), r.stderr);
});

test('a fixed listen port another process listens on is refused at start, not shared', { timeout: 30_000 }, async () => {
  const backend = await startBackend('port');
  const first = await startGateway({ backends: [backendEntry(backend, { name: 'port' })] });
  const port = first.port;
  const config = gatewayConfig({ listen: `127.0.0.1:${port}`, backends: [backendEntry(backend, { name: 'port' })] });
  const file = writeTempFile('llmproxy.yaml', toYaml(config));
  // Every worker listens with SO_REUSEPORT: without a check the second process would take part
  // of the first one's connections.
  const r = runGatewayCli(['--config', file]);
  assert.equal(r.status, 1, `exit ${r.status} ${r.signal ?? ''}\n${r.stderr}`);
  assert.match(r.stderr, /cannot listen on 127\.0\.0\.1:\d+: .*another process listens there/);
  // The check itself does not stand in the way: with the port free, the same config starts there.
  first.signal('SIGTERM');
  assert.deepEqual(await first.waitExit(15_000), { code: 0, signal: null }, first.describe());
  const second = await startGateway(config);
  assert.equal(second.port, port);
  const res = await httpRequest(`${second.url}/health`);
  assert.equal(res.status, 200);
});

test('a wrong command line exits 2 with the reason, whatever is wrong with it', { timeout: 20_000 }, () => {
  const file = writeTempFile('ok.yaml', 'backends:\n  - url: "http://127.0.0.1:9"\n');
  const cases = [
    [['--bogus'], /--bogus/],
    [['--config'], /--config/],
    [['extra-argument'], /extra-argument/],
    [['--check-config', file, '--config', file], /excludes/],
    [[], /--config FILE is required/],
  ];
  for (const [args, why] of cases) {
    const r = runGatewayCli(args);
    assert.equal(r.status, 2, `${args.join(' ')}: exit ${r.status}\n${r.stderr}`);
    assert.match(r.stderr, why, args.join(' '));
  }
});

test('--version prints a version and exits 0', { timeout: 20_000 }, () => {
  const r = runGatewayCli(['--version']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /\d+\.\d+\.\d+/);
});

test('--help describes the options and exits 0', { timeout: 20_000 }, () => {
  const r = runGatewayCli(['--help']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /--config/);
  assert.match(r.stdout, /--check-config/);
});

// The seed project's own example, as its README shows it (hostnames are never contacted here).
const SEED = `# 监听地址
listen: ":8080"

# 后端服务器列表
backends:
  - url: "http://vllm:8000"
    weight: 5
  - url: "http://tgi:8081"
    weight: 3

# 用量上报 Webhook 配置
usage_hook:
  enabled: true
  url: "https://your-billing.com/llm-usage"
  timeout: 1s
  retry: 2

# 健康检查配置
health_check:
  interval: 10s
  path: /health
`;

test("--check-config accepts the seed project's example config", { timeout: 20_000 }, () => {
  const file = writeTempFile('seed.yaml', SEED);
  const r = runGatewayCli(['--check-config', file]);
  assert.equal(r.status, 0, `stderr: ${r.stderr}`);
});

test('a seed-style config (listen ":0", usage_hook, short health_check) runs and proxies', { timeout: 30_000 }, async () => {
  const mock = await startMock({ name: 'seed' });
  // The usage hook points at a local server so nothing leaves this machine.
  const hook = await startBackend('hook');
  hook.handler = async (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"status":"ok"}');
  };
  const yaml = `listen: ":0"
backends:
  - url: "${mock.url}"
    weight: 5
usage_hook:
  enabled: true
  url: "${hook.url}/llm-usage"
  timeout: 1s
  retry: 2
health_check:
  interval: 10s
  path: /health
`;
  const gw = await startGateway(yaml);
  // ":PORT" is every address, IPv6 and IPv4 (as the seed's Go listener reads it); IPv4 alone
  // only on a machine without IPv6.
  assert.ok(['::', '0.0.0.0'].includes(gw.listenHost), `listening on ${gw.listenHost}`);
  assert.ok(gw.port > 0);
  await waitUntil(async () => (await httpRequest(`${gw.url}/ready`)).status === 200, { timeout: 10_000, what: '/ready 200' });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200, res.text());
  assert.equal(res.headers['x-mock-backend'], 'seed');
});

test('listen ":0" serves IPv4 and IPv6 clients, and names an IPv4 client a.b.c.d upstream', { timeout: 30_000 }, async (t) => {
  const backend = await startBackend('dual');
  // Whether this machine has IPv6 at all: a listener on ::1.
  const probe = net.createServer();
  const v6 = await new Promise((resolve) => {
    probe.once('error', () => resolve(false));
    probe.listen(0, '::1', () => probe.close(() => resolve(true)));
  });
  const gw = await startGateway(`listen: ":0"\nbackends:\n  - url: "${backend.url}"\nhealth_check:\n  enabled: false\n`);
  if (!v6) {
    // No IPv6 loopback: the kernel may still take a dual-stack [::] (IPv6 switched off by
    // sysctl) or not (no IPv6 at all); IPv4 clients are served either way.
    assert.ok(['::', '0.0.0.0'].includes(gw.listenHost), gw.listenHost);
    const res = await postJson(`http://127.0.0.1:${gw.port}`, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200);
    assert.equal(backend.apiRequests.at(-1).headers['x-forwarded-for'], '127.0.0.1');
    t.skip('no IPv6 loopback on this machine: IPv4 checked only');
    return;
  }
  assert.equal(gw.listenHost, '::');
  for (const [host, client] of [['127.0.0.1', '127.0.0.1'], ['[::1]', '::1']]) {
    const before = backend.apiRequests.length;
    const res = await postJson(`http://${host}:${gw.port}`, '/v1/chat/completions', chatBody('m1'));
    assert.equal(res.status, 200, `${host}: ${res.text()}`);
    assert.equal(backend.apiRequests[before].headers['x-forwarded-for'], client, host);
  }
});

// workers: 0 means the CPUs the process may run on, not the machine's: under taskset, a cpuset or
// a container's CPU quota, more threads than that are throttled, not run.
const haveTaskset = spawnSync('taskset', ['-c', '0', 'true']).status === 0;
test('server.workers 0 starts one worker per CPU of the affinity mask, not of the machine', { skip: !haveTaskset && 'taskset (util-linux) cannot pin here' }, async () => {
  const mock = await startMock();
  const file = writeTempFile('llmproxy.yaml', toYaml(gatewayConfig({ server: { workers: 0 }, backends: [backendEntry(mock)] })));
  const gw = await spawnListening('llmproxy', 'taskset', ['-c', '0', LLMPROXY_BIN, '--config', file]);
  assert.match(gw.stdout, /listening on \S+ \(1 worker, /);
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody());
  assert.equal(res.status, 200);
  gw.signal('SIGTERM');
  await gw.waitExit(15_000);
});
