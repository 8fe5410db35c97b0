// Delivering usage records to webhooks: nothing lost through an outage (refused, 500s, hangs past
// the timeout), dead letters for 4xx answers (never retried, listed by `llmproxy usage
// --dead-letters`), 408/429 retried, no loss across SIGKILL or a restart (each sink resumes from
// its own cursor in the usage log), signed POSTs, batches.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  mockStats,
  mockPathCount,
  startWebhook,
  restartGateway,
  verifySignature,
  postJson,
  chatBody,
  chatStreamContent,
  waitUntil,
  openAIError,
} from './lib/harness.mjs';
import { assertRecordShape, startUsageGateway, sinkConfig, scrapeMetrics, metricSum, usageCli, mapLimit, logContains } from './lib/usage.mjs';

let mock;

before(async () => {
  mock = await startMock({ name: 'mk', threads: 2 });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

// Sends `n` chat requests (every third a stream) with X-Request-Id PREFIX-0000, PREFIX-0001, ...
// (fixed width: no id is a substring of another), `concurrency` at a time; all must succeed.
async function fire(gw, n, prefix, { concurrency = 20 } = {}) {
  const ids = Array.from({ length: n }, (_, i) => `${prefix}-${String(i).padStart(4, '0')}`);
  await mapLimit(ids, concurrency, async (id, i) => {
    const stream = i % 3 === 2;
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1', { stream }), {
      headers: { 'x-request-id': id, 'x-user-id': `user-${prefix}`, 'x-mock-tokens': String(1 + (i % 5)) },
    });
    assert.equal(res.status, 200, `${id}: ${res.text().slice(0, 200)}`);
    if (stream) assert.ok(chatStreamContent(res.text()).done, `${id}: stream without [DONE]`);
  });
  return ids;
}

const allDelivered = (ids) => (hook) => ids.every((id) => hook.deliveredByClientId(id) !== undefined);

// Every delivered record of `hook` is well formed, and each of `ids` was delivered exactly once
// (more than once only for records listed in `mayRepeat`), and nothing else was delivered.
function assertExactlyOnce(hook, ids, { mayRepeat = new Set() } = {}) {
  for (const r of hook.delivered) assertRecordShape(r, `${hook.name} record`);
  const byClient = new Map();
  for (const r of hook.delivered) byClient.set(r.client_request_id, [...(byClient.get(r.client_request_id) ?? []), r]);
  for (const id of ids) {
    const recs = byClient.get(id) ?? [];
    assert.ok(recs.length >= 1, `${hook.name}: ${id} was never delivered`);
    assert.equal(new Set(recs.map((r) => r.request_id)).size, 1, `${hook.name}: ${id} has several request_ids`);
    if (recs.length > 1) assert.ok(mayRepeat.has(recs[0].request_id), `${hook.name}: ${id} delivered ${recs.length} times without a reason to retry`);
  }
  const extra = [...byClient.keys()].filter((id) => !ids.includes(id));
  assert.deepEqual(extra, [], `${hook.name}: records of requests nobody made`);
  assert.equal(hook.deliveredCounts().size, ids.length);
}

test('a full usage backlog refuses new requests with 503 usage_backlog (on_backlog: reject) until records can go again, and loses none', { timeout: 60_000 }, async () => {
  // durability: memory holds at most 3 undelivered records and queues 2 more; the sink's port
  // refuses connections, so the backlog fills.
  const hook = await startWebhook({ name: 'backlog' });
  const port = hook.port;
  await hook.stop();
  const gw = await startUsageGateway({
    mock,
    receiver: hook,
    hook: { timeout: '300ms', retry: 0, max_backoff: '100ms' },
    usage: { durability: 'memory', memory_max_records: 3, queue_size: 2 },
  });
  const accepted = [];
  let refused = null;
  for (let i = 0; i < 50 && !refused; i++) {
    const id = `backlog-${String(i).padStart(4, '0')}`;
    const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } });
    if (res.status === 200) accepted.push(id);
    else refused = res;
  }
  assert.ok(refused, 'no request was refused with the backlog full');
  assert.equal(refused.status, 503, refused.text());
  assert.equal(openAIError(refused).code, 'usage_backlog');
  assert.equal(refused.headers['retry-after'], '1');
  assert.ok(accepted.length >= 2 && accepted.length <= 5, `accepted ${accepted.length}`);
  assert.equal(metricSum(await scrapeMetrics(gw), 'llmproxy_usage_backlog_rejected_total'), 1);
  // The receiver is back: the records go, the backlog drains, requests are served again.
  await hook.listen(port);
  await waitUntil(
    async () => {
      const id = `backlog-after-${accepted.length}`;
      const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } });
      if (res.status === 200) accepted.push(id);
      return res.status === 200;
    },
    { timeout: 15_000, what: 'requests to be served again' },
  );
  await hook.waitFor(allDelivered(accepted), 15_000, `all ${accepted.length} accepted records delivered`);
  assertExactlyOnce(hook, accepted);
});

test('webhook outage: connection refused, then 500s, then hanging past the timeout, then recovery: every record is delivered', { timeout: 120_000 }, async () => {
  const hook = await startWebhook({ name: 'outage' });
  const port = hook.port;
  await hook.stop(); // from here on the port refuses connections
  const gw = await startUsageGateway({ mock, receiver: hook, hook: { timeout: '300ms', retry: 2, max_backoff: '200ms' } });
  const ids = [];

  // 1. Refused: the gateway keeps serving; its failed attempts show in /metrics.
  ids.push(...(await fire(gw, 10, 'outage-refused')));
  await waitUntil(async () => metricSum(await scrapeMetrics(gw), 'llmproxy_webhook_failure_total') >= 2, {
    timeout: 15_000,
    what: 'llmproxy_webhook_failure_total to count attempts on the refused port',
  });

  // 2. Back, but answering 500.
  hook.respond = () => 500;
  await hook.listen(port);
  ids.push(...(await fire(gw, 10, 'outage-500')));
  await hook.waitFor((h) => h.requests.filter((e) => e.status === 500).length >= 3, 15_000, 'three POSTs answered 500');

  // 3. Hanging: the sender must give up after its timeout and try again.
  hook.respond = () => ({ hang: true });
  const from = hook.requests.length;
  ids.push(...(await fire(gw, 10, 'outage-hang')));
  await hook.waitFor(
    (h) => h.requests.slice(from).filter((e) => e.outcome === 'hung' && e.closedAt !== null).length >= 2,
    15_000,
    'two hung POSTs abandoned by the sender after its timeout',
  );

  // 4. Recovery.
  hook.respond = () => 200;
  ids.push(...(await fire(gw, 10, 'outage-ok')));
  await hook.waitFor(allDelivered(ids), 60_000, `all ${ids.length} records delivered after the outage`);

  // A record may be delivered twice only if a POST of it hung (the receiver may have stored it).
  const hungIds = new Set(hook.requests.filter((e) => e.outcome === 'hung').flatMap((e) => e.records.map((r) => r.request_id)));
  assertExactlyOnce(hook, ids, { mayRepeat: hungIds });
  // Every 500 answer was retried: each record that got one was delivered later.
  for (const e of hook.requests.filter((x) => x.status === 500)) {
    for (const r of e.records) assert.ok(hook.deliveredCounts().get(r.request_id) >= 1, `${r.request_id} answered 500 was never retried`);
  }
});

test('4xx answers (400, 404, 422) are dead letters: never retried, listed by `llmproxy usage --dead-letters`', { timeout: 60_000 }, async () => {
  const deadStatus = { 'dead-0': 400, 'dead-1': 404, 'dead-2': 422 };
  const hook = await startWebhook({
    name: 'dead',
    respond: (e) => deadStatus[e.records[0]?.client_request_id] ?? 200,
  });
  const gw = await startUsageGateway({ mock, receiver: hook, hook: { retry: 2, max_backoff: '200ms' } });
  for (const id of Object.keys(deadStatus)) {
    assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } })).status, 200);
  }
  // Records after the dead ones still flow; two rounds give a retry every chance to show up.
  const fences = [];
  for (const id of ['fence-0', 'fence-1']) {
    assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': id } })).status, 200);
    await hook.waitForClientId(id, 15_000);
    fences.push(hook.deliveredByClientId(id).request_id);
  }
  const deadIds = [];
  for (const [id, status] of Object.entries(deadStatus)) {
    const attempts = hook.requests.filter((e) => e.records.some((r) => r.client_request_id === id));
    assert.equal(attempts.length, 1, `${id} answered ${status} was sent ${attempts.length} times`);
    assert.equal(attempts[0].status, status);
    assertRecordShape(attempts[0].records[0], id);
    deadIds.push(attempts[0].records[0].request_id);
  }
  let r;
  await waitUntil(
    () => {
      r = usageCli(['--db', gw.config.usage.log_path, '--dead-letters']);
      return r.status === 0 && deadIds.every((id) => r.stdout.includes(id));
    },
    { timeout: 15_000, what: 'the dead letters in `llmproxy usage --dead-letters`' },
  ).catch((err) => {
    throw new Error(`${err.message}\nexit ${r?.status}\nstdout: ${r?.stdout}\nstderr: ${r?.stderr}\nwant ${deadIds.join(', ')}`);
  });
  for (const id of fences) assert.ok(!r.stdout.includes(id), `delivered record ${id} listed as a dead letter:\n${r.stdout}`);
  // The seed's failure counter counts the rejected records (a receiver that rejects everything
  // must not look healthy on a dashboard), next to the sink's own dead-letter count.
  // (The sender counts a success once the receiver's 2xx reached it, after the receiver saw it.)
  let text = '';
  await waitUntil(async () => metricSum((text = await scrapeMetrics(gw)), 'llmproxy_webhook_success_total') === 2, {
    timeout: 10_000,
    what: 'llmproxy_webhook_success_total to count the two delivered records',
  });
  assert.equal(metricSum(text, 'llmproxy_usage_sink_records_total', { result: 'dead_letter' }), 3, text);
  assert.equal(metricSum(text, 'llmproxy_webhook_failure_total'), 3, text);
  // Reported at most once per 10 s, not once per rejected POST: fewer lines than rejections (the
  // three come well within 10 s, but a slow machine may split them over two reports).
  const reports = gw.stderr.match(/receiver rejected/g) ?? [];
  assert.ok(reports.length >= 1 && reports.length < 3, gw.stderr);
});

test('408, 429 and 5xx answers are retried until a 2xx', { timeout: 60_000 }, async () => {
  const script = [429, 408, 503, 200];
  const hook = await startWebhook({
    name: 'retry',
    respond: (e, h) => {
      const id = e.records[0]?.client_request_id;
      if (id !== 'retry-me') return 200;
      const n = h.requests.filter((x) => x.records[0]?.client_request_id === id).length; // this one included
      return script[Math.min(n, script.length) - 1];
    },
  });
  const gw = await startUsageGateway({ mock, receiver: hook, hook: { retry: 2, max_backoff: '200ms' } });
  assert.equal((await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { headers: { 'x-request-id': 'retry-me' } })).status, 200);
  await hook.waitForClientId('retry-me', 20_000);
  const attempts = hook.requests.filter((e) => e.records[0]?.client_request_id === 'retry-me');
  assert.deepEqual(
    attempts.map((e) => e.status),
    script,
  );
  assert.equal(new Set(attempts.map((e) => e.headers['idempotency-key'])).size, 1, 'every attempt carries the same Idempotency-Key');
  assert.equal(attempts[0].headers['idempotency-key'], attempts[0].records[0].request_id);
  assertExactlyOnce(hook, ['retry-me']);
});

test('SIGKILL with the receiver down, then a restart on the same usage log: every completed request is delivered once', { timeout: 120_000 }, async (t) => {
  const hook = await startWebhook({ name: 'kill' });
  const port = hook.port;
  await hook.stop();
  const gw = await startUsageGateway({ mock, receiver: hook });
  const ids = await fire(gw, 300, 'kill');
  // Records are committed a moment after their request ends: wait until the log holds them all
  // (read with the sqlite3 shell, whatever the schema), then kill -9.
  const log = gw.config.usage.log_path;
  let last = null;
  await waitUntil(
    () => {
      last = logContains(log, ids);
      if (last.error && /ENOENT/.test(last.error)) return true; // no sqlite3 shell: kill at once
      if (last.error) throw new Error(last.error);
      return last.ok;
    },
    { timeout: 15_000, what: 'the 300 records in the usage log' },
  ).catch((err) => {
    throw new Error(`${err.message}; missing ${last?.missing?.length}: ${last?.missing?.slice(0, 5).join(', ')}`);
  });
  if (last?.error) t.diagnostic(`sqlite3 unavailable (${last.error}): killed without checking the log first`);
  gw.signal('SIGKILL');
  const exit = await gw.waitExit(5_000);
  assert.equal(exit.signal, 'SIGKILL');
  assert.equal(hook.requests.length, 0);
  const killedAt = Date.now();

  await hook.listen(port);
  const gw2 = await restartGateway(gw);
  await hook.waitFor(allDelivered(ids), 60_000, 'the 300 records from before the kill');
  // The restarted gateway meters new traffic as well.
  const more = await fire(gw2, 5, 'after-kill');
  await hook.waitFor(allDelivered(more), 15_000, 'the records made after the restart');
  assertExactlyOnce(hook, [...ids, ...more]);
  // The ledger says that requests in flight at the kill were lost: a window over it is
  // incomplete, with --require-complete a failure.
  const until = new Date(killedAt + 1).toISOString();
  const report = usageCli(['--db', log, '--until', until, '--require-complete']);
  assert.equal(report.status, 1, report.stdout);
  assert.match(report.stderr, /stopped without settling \(a crash, kill -9, power loss, or a second stop signal that cut requests\)/);
});

test('signed POSTs: X-LLMProxy-Signature is the HMAC-SHA256 of "<timestamp>.<body>"; extra headers are sent', { timeout: 60_000 }, async () => {
  const secret = 'whsec_it_0123456789abcdef';
  const hook = await startWebhook({ name: 'signed' });
  const gw = await startUsageGateway({
    mock,
    receiver: hook,
    hook: { secret, headers: { 'X-Tenant': 'acme', Authorization: 'Bearer hook-token' } },
  });
  const ids = await fire(gw, 12, 'signed', { concurrency: 4 });
  await hook.waitFor(allDelivered(ids), 15_000, 'the signed records');
  assert.ok(hook.requests.length >= ids.length);
  for (const e of hook.requests) {
    const v = verifySignature(e, secret);
    assert.ok(v.ok, `POST ${e.seq}: ${v.reason}`);
    assert.equal(verifySignature(e, 'not-the-secret').ok, false, 'the verifier accepts any secret');
    assert.equal(e.headers['x-tenant'], 'acme');
    assert.equal(e.headers.authorization, 'Bearer hook-token');
    assert.match(String(e.headers['content-type']), /^application\/json/);
    assert.equal(e.headers['idempotency-key'], e.json.request_id);
  }
  assertExactlyOnce(hook, ids);
});

test('batch_size 50: JSON arrays of at most 50 records, keyed "<first request_id>+<count>", every record exactly once', { timeout: 60_000 }, async () => {
  const secret = 'whsec_batch';
  const hook = await startWebhook({ name: 'batch' });
  const gw = await startUsageGateway({ mock, receiver: hook, hook: { batch_size: 50, batch_interval: '100ms', secret } });
  const ids = await fire(gw, 120, 'batch', { concurrency: 20 });
  await hook.waitFor(allDelivered(ids), 20_000, 'the batched records');
  for (const e of hook.requests) {
    assert.ok(Array.isArray(e.json), `POST ${e.seq} is not an array: ${e.text.slice(0, 200)}`);
    assert.ok(e.json.length >= 1 && e.json.length <= 50, `batch of ${e.json.length}`);
    assert.equal(e.headers['idempotency-key'], `${e.json[0].request_id}+${e.json.length}`);
    const v = verifySignature(e, secret);
    assert.ok(v.ok, `POST ${e.seq}: ${v.reason}`);
  }
  assert.ok(
    hook.requests.some((e) => e.json.length > 1),
    `120 records in ${hook.requests.length} POSTs of ${hook.requests.map((e) => e.json.length)}: never more than one per batch`,
  );
  assertExactlyOnce(hook, ids);
  assert.equal(hook.delivered.length, 120);
});

// The benchmarks (bench/compare.sh) point usage_hook at the mock's own receiver, POST /mock/usage,
// which counts what it is given: it must count each record once, in both formats.
test('the mock as webhook receiver (/mock/usage) counts every record, one per POST and in batches', { timeout: 60_000 }, async () => {
  const receiver = await startMock({ name: 'usage-receiver' });
  const target = { url: `${receiver.url}/mock` }; // hookConfig appends /usage
  const single = await startUsageGateway({ mock, receiver: target });
  await fire(single, 30, 'mock-single', { concurrency: 10 });
  await waitUntil(async () => (await mockStats(receiver)).usage_records === 30, {
    timeout: 20_000,
    what: '30 records at /mock/usage',
  });
  assert.equal(await mockPathCount(receiver, '/mock/usage'), 30, 'one POST per record by default');

  const batched = await startUsageGateway({ mock, receiver: target, hook: { batch_size: 50, batch_interval: '100ms' } });
  await fire(batched, 120, 'mock-batch', { concurrency: 20 });
  await waitUntil(async () => (await mockStats(receiver)).usage_records === 150, {
    timeout: 20_000,
    what: '120 more records at /mock/usage',
  });
  const posts = (await mockPathCount(receiver, '/mock/usage')) - 30;
  assert.ok(posts >= 3 && posts < 120, `120 records in ${posts} POSTs: batches of at most 50, more than one record in some`);
  const stats = await mockStats(receiver);
  assert.equal(stats.bad_requests, 0, 'the receiver refused nothing');
  assert.equal(stats.usage_records, 150, 'nothing delivered twice');
});

test('a second sink in usage.sinks gets every record too; after a restart each sink resumes from its own cursor', { timeout: 120_000 }, async () => {
  const primary = await startWebhook({ name: 'primary' });
  const audit = await startWebhook({ name: 'audit' });
  const auditPort = audit.port;
  await audit.stop(); // the audit sink is down for the first half
  const gw = await startUsageGateway({ mock, receiver: primary, usage: { sinks: [sinkConfig('audit', audit)] } });
  const first = await fire(gw, 50, 'resume-1');
  await primary.waitFor(allDelivered(first), 15_000, 'the first half at the primary sink');
  assert.equal(audit.requests.length, 0);
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(30_000);
  assert.deepEqual(exit, { code: 0, signal: null });

  await audit.listen(auditPort);
  const gw2 = await restartGateway(gw);
  // The audit sink catches up from its cursor; the primary one does not send its records again.
  await audit.waitFor(allDelivered(first), 20_000, 'the first half at the audit sink after the restart');
  const second = await fire(gw2, 50, 'resume-2');
  await primary.waitFor(allDelivered(second), 15_000, 'the second half at the primary sink');
  await audit.waitFor(allDelivered(second), 15_000, 'the second half at the audit sink');
  const all = [...first, ...second];
  assertExactlyOnce(primary, all);
  assertExactlyOnce(audit, all);
  assert.equal(primary.delivered.length, 100);
  assert.equal(audit.delivered.length, 100);
  for (const e of audit.requests) assert.equal(e.url, '/audit');
  for (const e of primary.requests) assert.equal(e.url, '/usage');
  // Both sinks received the same records.
  const byId = new Map(primary.delivered.map((r) => [r.request_id, r]));
  for (const r of audit.delivered) assert.deepEqual(r, byId.get(r.request_id));
});

test('threads carry names an operator can tell apart: worker-N, usage-writer, sink-<name>', { timeout: 30_000 }, async () => {
  const primary = await startWebhook({ name: 'primary' });
  const audit = await startWebhook({ name: 'audit' });
  const gw = await startUsageGateway({ mock, receiver: primary, server: { workers: 2 }, usage: { sinks: [sinkConfig('audit', audit)] } });
  const names = () =>
    readdirSync(`/proc/${gw.pid}/task`)
      .map((tid) => {
        try {
          return readFileSync(`/proc/${gw.pid}/task/${tid}/comm`, 'utf8').trim();
        } catch {
          return ''; // a thread that ended between the listing and the read
        }
      })
      .sort();
  // Every thread names itself as it starts, in no particular order: wait until all have (a
  // thread that never does fails here with the names seen).
  const wanted = ['worker-0', 'worker-1', 'usage-writer', 'sink-usage_hook', 'sink-audit'];
  let got = [];
  await waitUntil(
    () => {
      got = names();
      return wanted.every((w) => got.includes(w));
    },
    { timeout: 10_000, what: 'every thread to name itself' },
  ).catch(() => {});
  for (const want of wanted) {
    assert.ok(got.includes(want), `thread ${want} among ${JSON.stringify(got)}`);
  }
});
