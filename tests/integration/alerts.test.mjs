// The shipped Prometheus alerting rules (deployments/alerts.yml): promtool accepts them and the
// compose stack's prometheus.yml, their own unit tests (alerts.test.yml) pass, and every metric
// and label they select is one a running gateway exports, so a renamed metric cannot leave an
// alert that never fires.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  postJson,
  chatBody,
  startWebhook,
  SUITE_DIR,
} from './lib/harness.mjs';
import { startUsageGateway, scrapeMetrics } from './lib/usage.mjs';

const DEPLOY = path.resolve(SUITE_DIR, '../../deployments');

function promtool(args) {
  const r = spawnSync('promtool', args, { cwd: DEPLOY, encoding: 'utf8', timeout: 60_000 });
  assert.ok(r.error === undefined, `promtool could not run: ${r.error}`);
  return r;
}

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

test('promtool checks the rules and prometheus.yml, and the rules pass their unit tests', () => {
  const rules = promtool(['check', 'rules', 'alerts.yml']);
  assert.equal(rules.status, 0, rules.stdout + rules.stderr);
  const config = promtool(['check', 'config', 'prometheus.yml']);
  assert.equal(config.status, 0, config.stdout + config.stderr);
  assert.match(config.stdout, /1 rule files found/);
  const unit = promtool(['test', 'rules', 'alerts.test.yml']);
  assert.equal(unit.status, 0, unit.stdout + unit.stderr);
  assert.match(unit.stdout, /SUCCESS/);
  // Every alert has a test case that names it.
  const names = [...fs.readFileSync(path.join(DEPLOY, 'alerts.yml'), 'utf8').matchAll(/- alert: (\w+)/g)].map((m) => m[1]);
  const tests = fs.readFileSync(path.join(DEPLOY, 'alerts.test.yml'), 'utf8');
  assert.ok(names.length >= 9, `alerts: ${names}`);
  for (const n of names) assert.match(tests, new RegExp(`alertname: ${n}\\b`), `no test case for ${n}`);
});

// Samples of an exposition as [{name, labels}].
function samples(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$/.exec(line);
    assert.ok(m, `unparsed exposition line: ${line}`);
    const labels = {};
    for (const p of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    out.push({ name: m[1], labels });
  }
  return out;
}

test('every metric and label the alerts select is exported by a gateway with metering and a sink', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'mk' });
  const hook = await startWebhook({ name: 'alerts' });
  const gw = await startUsageGateway({ mock, receiver: hook });
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'));
  assert.equal(res.status, 200);
  const exported = samples(await scrapeMetrics(gw));

  const rules = fs.readFileSync(path.join(DEPLOY, 'alerts.yml'), 'utf8');
  const selectors = [...rules.matchAll(/\b(llmproxy_[a-z_]+)(?:\{([^}]*)\})?/g)];
  assert.ok(selectors.length >= 9, `selectors found: ${selectors.length}`);
  for (const [, name, matchers] of selectors) {
    const ofName = exported.filter((s) => s.name === name);
    assert.ok(ofName.length > 0, `alerts.yml selects ${name}, which /metrics does not export`);
    for (const [, key, op, value] of (matchers ?? '').matchAll(/([a-z_]+)\s*(=~|!=|!~|=)\s*"([^"]*)"/g)) {
      assert.ok(ofName.some((s) => key in s.labels), `${name} has no label ${key}`);
      // An equality matcher must name a value the gateway uses (a regex may match none yet).
      if (op === '=') assert.ok(ofName.some((s) => s.labels[key] === value), `${name}{${key}="${value}"} is never exported`);
      if (op === '=~') {
        const re = new RegExp(`^(?:${value})$`);
        if (key === 'path') assert.ok(ofName.some((s) => re.test(s.labels.path)), `${name}{path=~"${value}"} matches no exported path`);
      }
    }
  }
  // The labels the rules group and join by, besides Prometheus's own job and instance.
  for (const [, labels] of rules.matchAll(/\b(?:by|on)\s*\(([^)]*)\)/g)) {
    for (const key of labels.split(',').map((k) => k.trim())) {
      if (key === 'job' || key === 'instance') continue;
      assert.ok(exported.some((s) => s.name.startsWith('llmproxy_usage_sink') && key in s.labels), `no exported series has label ${key}`);
    }
  }
});
