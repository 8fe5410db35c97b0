// 2,000 mixed requests (chat, completions, embeddings; streamed and not; 20 at a time) make
// exactly 2,000 records, one per request, whose numbers are what each response reported.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { cleanup, checkProcesses, trackTest, startMock, startWebhook, keepAliveAgent, postJson } from './lib/harness.mjs';
import { assertRecordShape, startUsageGateway, streamEvents, lastUsage, usageOnlyChunks, mapLimit } from './lib/usage.mjs';

let mock;
let hook;
let gw;

before(async () => {
  mock = await startMock({ name: 'mk', threads: 4 });
  hook = await startWebhook({ name: 'load' });
  gw = await startUsageGateway({ mock, receiver: hook, server: { workers: 4 }, hook: { timeout: '5s' } });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

const N = 2_000;
const KINDS = [
  'chat',
  'chat-stream-asked', // the client asks for usage: it sees the numbers itself
  'chat-stream', // the gateway injects include_usage: the numbers come from the mock directly
  'completions',
  'completions-stream-asked',
  'embeddings',
];
const FLAVORS = ['openai', 'vllm', 'tgi', 'llamacpp'];

function requestFor(i) {
  const kind = KINDS[i % KINDS.length];
  const text = `request ${i} ${'lorem '.repeat(i % 11)}`;
  const headers = {
    'x-request-id': `load-${String(i).padStart(5, '0')}`,
    'x-user-id': `user-${i % 7}`,
    'x-mock-tokens': String(1 + (i % 13)),
    'x-mock-flavor': FLAVORS[Math.floor(i / KINDS.length) % FLAVORS.length],
  };
  const stream = kind.includes('stream');
  const asked = kind.endsWith('asked') ? { stream_options: { include_usage: true } } : {};
  if (kind.startsWith('chat')) {
    return { kind, path: '/v1/chat/completions', headers, body: { model: 'm1', messages: [{ role: 'user', content: text }], stream, ...asked } };
  }
  if (kind.startsWith('completions')) return { kind, path: '/v1/completions', headers, body: { model: 'm1', prompt: text, stream, ...asked } };
  return { kind, path: '/v1/embeddings', headers, body: { model: 'e1', input: [text, `${text} again`] } };
}

test('2,000 mixed requests, 20 at a time: exactly 2,000 records, unique request ids, the reported numbers', { timeout: 240_000 }, async () => {
  const agent = keepAliveAgent({ maxSockets: 20 });
  const requests = Array.from({ length: N }, (_, i) => requestFor(i));
  const expected = await mapLimit(requests, 20, async (r) => {
    const res = await postJson(gw.url, r.path, r.body, { headers: r.headers, agent });
    assert.equal(res.status, 200, `${r.headers['x-request-id']}: ${res.text().slice(0, 200)}`);
    if (!r.body.stream) return res.json().usage;
    const events = streamEvents(res.text());
    assert.equal(events.at(-1), '[DONE]');
    if (r.kind.endsWith('asked')) {
      const usage = lastUsage(events);
      assert.ok(usage, `${r.headers['x-request-id']}: asked for usage, got none`);
      return usage;
    }
    assert.equal(usageOnlyChunks(events).length, 0, `${r.headers['x-request-id']}: an injected usage chunk reached the client`);
    // What the mock reports for this prompt and token count (it is deterministic).
    const direct = await postJson(mock.url, r.path, { ...r.body, stream: false }, { headers: r.headers });
    assert.equal(direct.status, 200);
    return direct.json().usage;
  });

  await hook.waitForDelivered(N, 120_000);
  const recs = hook.delivered;
  assert.equal(recs.length, N, `${recs.length} records for ${N} requests`);
  assert.equal(new Set(recs.map((r) => r.request_id)).size, N, 'request_id is not unique');
  const byClient = new Map(recs.map((r) => [r.client_request_id, r]));
  assert.equal(byClient.size, N);
  let prompt = 0;
  let completion = 0;
  let total = 0;
  let wantPrompt = 0;
  let wantCompletion = 0;
  let wantTotal = 0;
  requests.forEach((r, i) => {
    const id = r.headers['x-request-id'];
    const rec = byClient.get(id);
    assert.ok(rec, `no record for ${id}`);
    assertRecordShape(rec, id);
    const usage = expected[i];
    assert.equal(rec.prompt_tokens, usage.prompt_tokens, `${id} (${r.kind}) prompt_tokens`);
    assert.equal(rec.completion_tokens, usage.completion_tokens ?? 0, `${id} (${r.kind}) completion_tokens`);
    assert.equal(rec.total_tokens, usage.total_tokens, `${id} (${r.kind}) total_tokens`);
    assert.equal(rec.usage_source, 'backend', id);
    assert.equal(rec.finish, 'completed', id);
    assert.equal(rec.is_stream, r.body.stream === true, id);
    assert.equal(rec.endpoint, r.path, id);
    assert.equal(rec.user_id, r.headers['x-user-id'], id);
    prompt += rec.prompt_tokens;
    completion += rec.completion_tokens;
    total += rec.total_tokens;
    wantPrompt += usage.prompt_tokens;
    wantCompletion += usage.completion_tokens ?? 0;
    wantTotal += usage.total_tokens;
  });
  assert.deepEqual({ prompt, completion, total }, { prompt: wantPrompt, completion: wantCompletion, total: wantTotal });
  // Nothing arrived twice: the receiver answered every POST 200 at once.
  assert.equal(hook.records.length, N);
});
