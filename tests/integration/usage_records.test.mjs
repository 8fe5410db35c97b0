// Usage records, as a webhook receives them: the seed's payload (fields, order, types), one record
// per LLM request that reached a backend with the numbers the backend reported (every mock flavor,
// streamed or not), stream_options.include_usage added upstream and its chunk removed from the
// client's stream, estimates when no usage comes (backend sent none, client hung up, upstream cut,
// timeout), no record for requests the gateway refused itself, the `llmproxy usage` report and the
// usage counters of /metrics.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startMock,
  startBackend,
  startWebhook,
  backendEntry,
  postJson,
  chatBody,
  openRawStream,
  jsonPostBytes,
  sseData,
  rawExchange,
  openAIError,
  mockPathCount,
  waitUntil,
  mockTokens,
  chatStreamContent,
  startGateway,
  deferred,
  delay,
} from './lib/harness.mjs';
import {
  SEED_KEYS,
  EXTRA_KEYS,
  TIMESTAMP_RE,
  assertRecordShape,
  startUsageGateway,
  streamEvents,
  normalizeEvents,
  lastUsage,
  usageOnlyChunks,
  scrapeMetrics,
  metricSum,
  usageCli,
  parseJsonOutput,
  objectsWithContext,
} from './lib/usage.mjs';

const FLAVORS = ['openai', 'vllm', 'tgi', 'llamacpp'];
const PATHS = { chat: '/v1/chat/completions', completions: '/v1/completions' };

let mock;
let receiver;
let gw;
let seq = 0;
const nextId = (prefix) => `${prefix}-${++seq}`;

before(async () => {
  mock = await startMock({ name: 'mk', threads: 2 });
  receiver = await startWebhook({ name: 'hook' });
  gw = await startUsageGateway({ mock, receiver });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

function genBody(kind, text, extra = {}) {
  return kind === 'chat' ? { model: 'm1', messages: [{ role: 'user', content: text }], ...extra } : { model: 'm1', prompt: text, ...extra };
}

function send(path, body, { id, headers = {}, to = gw } = {}) {
  return postJson(to.url, path, body, { headers: { ...(id ? { 'x-request-id': id } : {}), ...headers } });
}

// The one delivered record of client request `id` (its X-Request-Id), shape-checked.
async function recordOf(id, { timeout = 10_000, from = receiver } = {}) {
  const rec = await from.waitForClientId(id, timeout);
  assertRecordShape(rec, `record of ${id}`);
  assert.equal(from.delivered.filter((r) => r.client_request_id === id).length, 1, `more than one record for ${id}`);
  return rec;
}

function assertNumbers(rec, usage, what) {
  assert.ok(usage, `${what}: the backend reported no usage to compare with`);
  assert.equal(rec.prompt_tokens, usage.prompt_tokens, `${what}: prompt_tokens ${JSON.stringify(rec)} vs ${JSON.stringify(usage)}`);
  assert.equal(rec.completion_tokens, usage.completion_tokens ?? 0, `${what}: completion_tokens`);
  assert.equal(rec.total_tokens, usage.total_tokens, `${what}: total_tokens`);
}

// The mock's own non-stream answer for `body`: the usage it reports for that prompt.
async function mockUsage(path, body, headers) {
  const res = await postJson(mock.url, path, { ...body, stream: false, stream_options: undefined }, { headers });
  assert.equal(res.status, 200, res.text());
  return res.json().usage;
}

// ---- the seed's payload ----

test("one non-stream chat request: the webhook gets one object, the seed's 11 fields first, in order, with the right types and values", { timeout: 30_000 }, async () => {
  const id = nextId('seed');
  const started = Date.now();
  const res = await send('/v1/chat/completions', chatBody('m1'), {
    id,
    headers: { 'x-user-id': 'alice', authorization: 'Bearer sk-prod-xxx', 'x-mock-tokens': '12' },
  });
  assert.equal(res.status, 200, res.text());
  const usage = res.json().usage;
  const rec = await recordOf(id);
  const delivered = Date.now();
  // The mock reports neither cached nor reasoning tokens: exactly the seed's fields, then the additions.
  assert.deepEqual(Object.keys(rec), [...SEED_KEYS, ...EXTRA_KEYS]);
  assert.equal(typeof rec.request_id, 'string');
  assert.ok(rec.request_id.length > 0);
  assert.notEqual(rec.request_id, id, "request_id is the gateway's own id, not the client's X-Request-Id");
  assert.equal(rec.user_id, 'alice');
  assert.equal(rec.api_key, 'sk-prod-xxx');
  assert.equal(rec.model, 'm1');
  assert.equal(rec.prompt_tokens, usage.prompt_tokens);
  assert.equal(rec.completion_tokens, 12);
  assert.equal(rec.completion_tokens, usage.completion_tokens);
  assert.equal(rec.total_tokens, usage.total_tokens);
  assert.equal(rec.is_stream, false);
  assert.equal(rec.endpoint, '/v1/chat/completions');
  assert.match(rec.timestamp, TIMESTAMP_RE);
  const ts = Date.parse(rec.timestamp);
  assert.ok(ts >= Math.floor(started / 1000) * 1000 && ts <= delivered, `timestamp ${rec.timestamp} is not between ${new Date(started).toISOString()} and ${new Date(delivered).toISOString()}`);
  assert.equal(rec.backend_url, mock.url, 'backend_url is the URL as configured');
  assert.equal(rec.client_request_id, id);
  assert.equal(rec.backend, 'mk');
  assert.equal(rec.status_code, 200);
  assert.equal(rec.finish, 'completed');
  assert.equal(rec.usage_source, 'backend');

  // The POST itself: one JSON object (not an array), keyed for de-duplication by the request id.
  const attempts = receiver.attemptsFor(rec.request_id);
  assert.equal(attempts.length, 1);
  const [post] = attempts;
  assert.equal(post.method, 'POST');
  assert.equal(post.url, '/usage');
  assert.match(String(post.headers['content-type']), /^application\/json/);
  assert.equal(post.headers['idempotency-key'], rec.request_id);
  assert.ok(!Array.isArray(post.json), 'batch_size 1 posts one object');
  assert.equal(post.json.request_id, rec.request_id);
});

test('request ids are unique per request, also when clients repeat their X-Request-Id', { timeout: 30_000 }, async () => {
  const id = nextId('same');
  for (let i = 0; i < 3; i++) assert.equal((await send('/v1/chat/completions', chatBody('m1'), { id })).status, 200);
  await receiver.waitFor((r) => r.delivered.filter((x) => x.client_request_id === id).length >= 3, 10_000, `3 records of ${id}`);
  const recs = receiver.delivered.filter((x) => x.client_request_id === id);
  assert.equal(recs.length, 3);
  assert.equal(new Set(recs.map((r) => r.request_id)).size, 3);
});

test('user_id: X-User-Id, else the body\'s "user", else ""; api_key: Bearer or X-API-Key, else ""; client_request_id null without X-Request-Id', { timeout: 30_000 }, async () => {
  const cases = [
    { model: 'm-who-1', headers: { 'x-user-id': 'carol', authorization: 'Bearer sk-h' }, user: 'dave', want: { user_id: 'carol', api_key: 'sk-h' } },
    { model: 'm-who-2', headers: { 'x-api-key': 'sk-x-api' }, user: 'bob', want: { user_id: 'bob', api_key: 'sk-x-api' } },
    { model: 'm-who-3', headers: {}, user: undefined, want: { user_id: '', api_key: '' } },
  ];
  for (const c of cases) {
    const body = { ...chatBody(c.model), ...(c.user ? { user: c.user } : {}) };
    const res = await send('/v1/chat/completions', body, { headers: c.headers });
    assert.equal(res.status, 200);
  }
  // No X-Request-Id was sent: find each record by its (unique) model.
  await receiver.waitFor((r) => cases.every((c) => r.delivered.some((x) => x.model === c.model)), 10_000, 'the three records');
  for (const c of cases) {
    const recs = receiver.delivered.filter((x) => x.model === c.model);
    assert.equal(recs.length, 1, c.model);
    assertRecordShape(recs[0], c.model);
    assert.equal(recs[0].user_id, c.want.user_id, c.model);
    assert.equal(recs[0].api_key, c.want.api_key, c.model);
    assert.equal(recs[0].client_request_id, null, c.model);
  }
});

// ---- numbers: what the backend reported, for every flavor, streamed or not ----

for (const flavor of FLAVORS) {
  for (const kind of ['chat', 'completions']) {
    for (const stream of [false, true]) {
      const continuous = flavor === 'vllm' && stream;
      const what = `${flavor} ${kind} ${stream ? 'stream' : 'non-stream'}${continuous ? ' (continuous_usage_stats)' : ''}`;
      test(`${what}: the record's numbers are what the backend reported`, { timeout: 30_000 }, async () => {
        const id = nextId(`num-${flavor}-${kind}`);
        const path = PATHS[kind];
        const text = `Numbers for ${what}: a prompt of some length`;
        const headers = { 'x-mock-flavor': flavor, 'x-mock-tokens': '9' };
        let reported;
        if (!stream) {
          const res = await send(path, genBody(kind, text), { id, headers });
          assert.equal(res.status, 200, res.text());
          reported = res.json().usage;
        } else {
          // The client does not ask for usage (continuous stats for vLLM: cumulative on every chunk).
          const extra = continuous ? { stream_options: { continuous_usage_stats: true } } : {};
          const res = await send(path, genBody(kind, text, { stream: true, ...extra }), { id, headers });
          assert.equal(res.status, 200, res.text());
          assert.equal(chatStreamContent(res.text()).content, mockTokens(9));
          // The reference: the mock streamed directly to a client that asked for usage.
          const direct = await postJson(mock.url, path, genBody(kind, text, { stream: true, stream_options: { include_usage: true, ...extra.stream_options } }), { headers });
          assert.equal(direct.status, 200);
          reported = lastUsage(streamEvents(direct.text()));
        }
        const rec = await recordOf(id);
        assertNumbers(rec, reported, what);
        assert.equal(rec.completion_tokens, 9);
        assert.equal(rec.usage_source, 'backend');
        assert.equal(rec.finish, 'completed');
        assert.equal(rec.is_stream, stream);
        assert.equal(rec.endpoint, path);
        assert.equal(rec.status_code, 200);
        assert.equal(rec.model, 'm1');
        assert.equal(rec.backend, 'mk');
        assert.equal(rec.backend_url, mock.url);
        if (stream) assert.equal(typeof rec.ttft_ms, 'number', 'a completed stream has a time to first token');
      });
    }
  }
}

test('embeddings: prompt and total tokens as reported, completion_tokens 0', { timeout: 30_000 }, async () => {
  const id = nextId('emb');
  const res = await send('/v1/embeddings', { model: 'e1', input: ['one two three', 'four five'] }, { id });
  assert.equal(res.status, 200, res.text());
  const usage = res.json().usage;
  const rec = await recordOf(id);
  assert.equal(rec.prompt_tokens, usage.prompt_tokens);
  assert.equal(rec.completion_tokens, 0);
  assert.equal(rec.total_tokens, usage.total_tokens);
  assert.equal(rec.endpoint, '/v1/embeddings');
  assert.equal(rec.model, 'e1');
  assert.equal(rec.is_stream, false);
  assert.equal(rec.usage_source, 'backend');
  assert.equal(rec.finish, 'completed');
});

// ---- include_usage injection ----

for (const flavor of FLAVORS) {
  for (const kind of ['chat', 'completions']) {
    test(`${flavor} ${kind} stream without include_usage: the client's stream is what the mock sends such a client; the record has the backend's numbers`, { timeout: 30_000 }, async () => {
      const id = nextId(`inj-${flavor}-${kind}`);
      const path = PATHS[kind];
      const headers = { 'x-mock-flavor': flavor, 'x-mock-tokens': '5' };
      const body = genBody(kind, `Compare the ${flavor} ${kind} streams`, { stream: true });
      const viaGateway = await send(path, body, { id, headers });
      const direct = await postJson(mock.url, path, body, { headers });
      assert.equal(viaGateway.status, 200, viaGateway.text());
      assert.equal(direct.status, 200);
      assert.match(String(viaGateway.headers['content-type']), /^text\/event-stream/);
      const got = streamEvents(viaGateway.text());
      const want = streamEvents(direct.text());
      assert.deepEqual(normalizeEvents(got), normalizeEvents(want), `gateway stream:\n${viaGateway.text()}\nmock stream:\n${direct.text()}`);
      assert.equal(usageOnlyChunks(got).length, 0, 'the usage chunk the gateway caused reached the client');
      assert.equal(got.at(-1), '[DONE]');
      const rec = await recordOf(id);
      assertNumbers(rec, await mockUsage(path, body, headers), `${flavor} ${kind}`);
      assert.equal(rec.usage_source, 'backend', 'injected include_usage: the backend reported usage');
    });
  }
}

test('vllm stream with only continuous_usage_stats: usage asked for (vLLM\'s include_usage defaults to true), the stream passes untouched', { timeout: 30_000 }, async () => {
  const id = nextId('inj-vllm-cont');
  const headers = { 'x-mock-flavor': 'vllm', 'x-mock-tokens': '6' };
  const body = genBody('chat', 'Continuous stats, please', { stream: true, stream_options: { continuous_usage_stats: true } });
  const viaGateway = await send(PATHS.chat, body, { id, headers });
  const direct = await postJson(mock.url, PATHS.chat, body, { headers });
  const got = streamEvents(viaGateway.text());
  assert.deepEqual(normalizeEvents(got), normalizeEvents(streamEvents(direct.text())));
  // Every content chunk still carries the running usage the client asked for, and the final
  // usage chunk vLLM sends by default is not taken away.
  const withUsage = got.filter((e) => typeof e === 'object' && e.usage);
  assert.ok(withUsage.length >= 6, `continuous usage stats lost: ${viaGateway.text()}`);
  assert.equal(usageOnlyChunks(got).length, 1);
  const rec = await recordOf(id);
  assertNumbers(rec, lastUsage(got), 'vllm continuous');
  assert.equal(rec.usage_source, 'backend');
});

for (const flavor of ['openai', 'tgi']) {
  test(`${flavor} stream with only continuous_usage_stats: the gateway still asks for usage, and bills the backend's numbers`, { timeout: 30_000 }, async () => {
    // Servers other than vLLM default include_usage to false: without the gateway's explicit
    // include_usage this stream would carry no usage and be billed from an estimate.
    const id = nextId(`inj-cont-${flavor}`);
    const headers = { 'x-mock-flavor': flavor, 'x-mock-tokens': '5' };
    const body = genBody('chat', `Continuous stats from ${flavor}`, { stream: true, stream_options: { continuous_usage_stats: true } });
    const direct = await postJson(mock.url, PATHS.chat, body, { headers });
    assert.equal(lastUsage(streamEvents(direct.text())), null, 'this backend sends no usage on its own');
    const viaGateway = await send(PATHS.chat, body, { id, headers });
    assert.equal(viaGateway.status, 200, viaGateway.text());
    const got = streamEvents(viaGateway.text());
    // The client asked for usage the way vLLM reads it, and gets what vLLM would send.
    const chunks = usageOnlyChunks(got);
    assert.equal(chunks.length, 1, viaGateway.text());
    const rec = await recordOf(id);
    assert.equal(rec.usage_source, 'backend');
    assertNumbers(rec, chunks[0].usage, `${flavor} continuous_usage_stats`);
    assert.equal(rec.completion_tokens, 5);
  });
}

test('vllm stream with include_usage false and continuous_usage_stats: the client gets no usage, the record the backend\'s', { timeout: 30_000 }, async () => {
  const id = nextId('inj-vllm-off');
  const headers = { 'x-mock-flavor': 'vllm', 'x-mock-tokens': '6' };
  const body = genBody('chat', 'No usage for me', { stream: true, stream_options: { include_usage: false, continuous_usage_stats: true } });
  const viaGateway = await send(PATHS.chat, body, { id, headers });
  assert.equal(viaGateway.status, 200);
  const got = streamEvents(viaGateway.text());
  assert.ok(got.length >= 6, viaGateway.text());
  assert.deepEqual(got.filter((e) => typeof e === 'object' && e.usage), [], `usage reached the client: ${viaGateway.text()}`);
  const rec = await recordOf(id);
  assert.equal(rec.usage_source, 'backend');
  assert.equal(rec.completion_tokens, 6);
});

for (const flavor of FLAVORS) {
  test(`${flavor} chat stream with include_usage: the client gets the usage untouched`, { timeout: 30_000 }, async () => {
    const id = nextId(`asked-${flavor}`);
    const headers = { 'x-mock-flavor': flavor, 'x-mock-tokens': '4' };
    const body = genBody('chat', `I want the usage from ${flavor}`, { stream: true, stream_options: { include_usage: true } });
    const viaGateway = await send(PATHS.chat, body, { id, headers });
    const direct = await postJson(mock.url, PATHS.chat, body, { headers });
    assert.equal(viaGateway.status, 200);
    // Nothing to remove: the stream is the mock's, byte for byte apart from the id and clock.
    const scrub = (t) => t.replace(/"id":"[^"]+"/g, '"id":"<id>"').replace(/"created":\d+/g, '"created":0');
    assert.equal(scrub(viaGateway.text()), scrub(direct.text()));
    const got = streamEvents(viaGateway.text());
    const usage = lastUsage(got);
    assert.ok(usage, 'the client asked for usage and got none');
    if (flavor === 'llamacpp') {
      // llama.cpp: usage rides on the finish chunk, whose choices are not empty.
      const carrier = got.find((e) => typeof e === 'object' && e.usage);
      assert.ok(carrier.choices.length > 0 && carrier.choices[0].finish_reason);
    } else {
      const chunks = usageOnlyChunks(got);
      assert.equal(chunks.length, 1, 'one usage chunk');
      assert.deepEqual(chunks[0].usage, usage);
    }
    const rec = await recordOf(id);
    assertNumbers(rec, usage, flavor);
    assert.equal(rec.usage_source, 'backend');
  });
}

test('inject_stream_usage: false: continuous vLLM stats count by their last value (never the sum); no usage at all is estimated', { timeout: 30_000 }, async () => {
  const gw2 = await startUsageGateway({ mock, receiver, usage: { inject_stream_usage: false } });
  const headers = { 'x-mock-flavor': 'vllm', 'x-mock-tokens': '8' };
  const contBody = genBody('chat', 'Only continuous stats, nothing injected', { stream: true, stream_options: { continuous_usage_stats: true } });
  const id1 = nextId('noinj-cont');
  const res1 = await send(PATHS.chat, contBody, { id: id1, headers, to: gw2 });
  const direct1 = await postJson(mock.url, PATHS.chat, contBody, { headers });
  // Nothing injected: the client's stream is exactly the mock's.
  assert.deepEqual(normalizeEvents(streamEvents(res1.text())), normalizeEvents(streamEvents(direct1.text())));
  const rec1 = await recordOf(id1);
  const final = lastUsage(streamEvents(res1.text()));
  assert.equal(final.completion_tokens, 8);
  assertNumbers(rec1, final, 'last cumulative value');
  assert.equal(rec1.usage_source, 'backend');

  const id2 = nextId('noinj-none');
  const plainBody = genBody('chat', 'No usage anywhere', { stream: true });
  const res2 = await send(PATHS.chat, plainBody, { id: id2, headers: { 'x-mock-flavor': 'openai', 'x-mock-tokens': '8' }, to: gw2 });
  assert.equal(lastUsage(streamEvents(res2.text())), null);
  const rec2 = await recordOf(id2);
  assert.equal(rec2.usage_source, 'estimated');
  assert.ok(rec2.completion_tokens > 0);
});

// ---- no usage from the backend; cut requests ----

for (const stream of [false, true]) {
  for (const flavor of ['openai', 'vllm']) {
    test(`${flavor} ${stream ? 'stream' : 'non-stream'} with no usage from the backend: a record with usage_source "estimated"`, { timeout: 30_000 }, async () => {
      const id = nextId(`est-${flavor}`);
      const headers = { 'x-mock-flavor': flavor, 'x-mock-tokens': '10', 'x-mock-no-usage': '1' };
      const body = genBody('chat', `Estimate me, ${flavor}, there is no usage in the answer`, { stream });
      const tokenizeBefore = await mockPathCount(mock, '/tokenize');
      const res = await send(PATHS.chat, body, { id, headers });
      assert.equal(res.status, 200);
      if (!stream) assert.equal(res.json().usage, undefined, 'the mock did report usage');
      else assert.equal(lastUsage(streamEvents(res.text())), null);
      const rec = await recordOf(id);
      assert.equal(rec.usage_source, 'estimated');
      assert.equal(rec.finish, 'completed');
      assert.ok(rec.completion_tokens > 0, `completion_tokens ${rec.completion_tokens}`);
      assert.ok(rec.prompt_tokens > 0, `prompt_tokens ${rec.prompt_tokens}`);
      if (flavor === 'vllm') {
        // usage.tokenize (on by default): the prompt is counted by the backend's /tokenize.
        assert.ok((await mockPathCount(mock, '/tokenize')) > tokenizeBefore, 'the gateway did not call /tokenize');
        const tok = await postJson(mock.url, '/tokenize', { model: 'm1', messages: body.messages });
        assert.equal(tok.status, 200);
        assert.equal(rec.prompt_tokens, tok.json().count, 'prompt_tokens as the backend tokenizes the prompt');
      }
    });
  }
}

// A conversation with tool definitions and an assistant tool call: chat templates write both into
// the prompt, so a backend bills them (the mock counts their JSON text too).
const TOOLS = [
  { type: 'function', function: { name: 'get_forecast', description: 'Daily forecast for a city.', parameters: { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer', minimum: 1, maximum: 7 } }, required: ['city', 'days'] } } },
  { type: 'function', function: { name: 'get_weather', description: 'Current weather for a city.', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } },
];
const TOOL_MESSAGES = [
  { role: 'user', content: 'Umbrella for Porto this weekend?' },
  { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_forecast', arguments: '{"city":"Porto","days":3}' } }] },
  { role: 'tool', tool_call_id: 'call_1', content: '[{"day":"Sat","rain_mm":7.5}]' },
];

test('no usage from the backend for a chat with tools: /tokenize is sent the tools, and the record bills them as the backend counts them', { timeout: 30_000 }, async () => {
  for (const stream of [false, true]) {
    const id = nextId(`tools-tok-${stream}`);
    const body = { model: 'm1', messages: TOOL_MESSAGES, tools: TOOLS, stream };
    const res = await send(PATHS.chat, body, { id, headers: { 'x-mock-flavor': 'vllm', 'x-mock-tokens': '6', 'x-mock-no-usage': '1' } });
    assert.equal(res.status, 200);
    const rec = await recordOf(id);
    assert.equal(rec.usage_source, 'estimated');
    // What the backend bills for this very request when it reports usage.
    const billed = await postJson(mock.url, PATHS.chat, { ...body, stream: false }, { headers: { 'x-mock-tokens': '6' } });
    const withoutTools = await postJson(mock.url, '/tokenize', { model: 'm1', messages: TOOL_MESSAGES });
    assert.ok(billed.json().usage.prompt_tokens > withoutTools.json().count + 50, 'the tools are a large part of this prompt');
    assert.equal(rec.prompt_tokens, billed.json().usage.prompt_tokens, `${stream ? 'stream' : 'non-stream'}: prompt_tokens with the tools`);
  }
});

test('a repeated key in the request body: /tokenize counts the last copy, the one backends run', { timeout: 30_000 }, async () => {
  const short = [{ role: 'user', content: 'hi' }];
  const long = [{ role: 'user', content: 'the prompt the backend runs, '.repeat(200) }];
  for (const stream of [false, true]) {
    const id = nextId(`dup-key-${stream}`);
    const raw = `{"model":"m1","stream":${stream},"messages":${JSON.stringify(short)},"messages":${JSON.stringify(long)}}`;
    const res = await send(PATHS.chat, raw, { id, headers: { 'x-mock-flavor': 'vllm', 'x-mock-tokens': '3', 'x-mock-no-usage': '1' } });
    assert.equal(res.status, 200);
    const rec = await recordOf(id);
    assert.equal(rec.usage_source, 'estimated');
    const counted = await postJson(mock.url, '/tokenize', { model: 'm1', messages: long });
    assert.equal(rec.prompt_tokens, counted.json().count, `${stream ? 'stream' : 'non-stream'}: the last messages, as the backend counts them`);
  }
});

test('a user header over 1,024 bytes or a kept-whole API key over 4 KiB: 400 string_above_max_length, nothing forwarded or billed', { timeout: 30_000 }, async () => {
  const before = await mockPathCount(mock, PATHS.chat);
  const cases = [
    [{ 'x-user-id': 'u'.repeat(1025) }, /'x-user-id' header.*at most 1024 bytes, but got 1025/i],
    [{ authorization: `Bearer ${'k'.repeat(4097)}` }, /'Authorization' header.*at most 4096 bytes, but got 4097/],
    [{ 'x-api-key': 'k'.repeat(4097) }, /'X-API-Key' header.*at most 4096 bytes, but got 4097/],
    // Not a Bearer token: the key is X-API-Key's, and the message names that header.
    [{ authorization: 'Basic dXNlcjpwYXNz', 'x-api-key': 'k'.repeat(4097) }, /'X-API-Key' header.*but got 4097/],
  ];
  for (const [headers, message] of cases) {
    const id = nextId('long-id');
    const res = await send(PATHS.chat, chatBody('m1'), { id, headers });
    assert.equal(res.status, 400, res.text());
    const e = res.json().error;
    assert.equal(e.code, 'string_above_max_length');
    assert.equal(e.type, 'invalid_request_error');
    assert.match(e.message, message);
  }
  assert.equal(await mockPathCount(mock, PATHS.chat), before, 'refused requests reached the backend');
  // At the bounds: served and billed with the values whole.
  const id = nextId('long-id-ok');
  const res = await send(PATHS.chat, chatBody('m1'), { id, headers: { 'x-user-id': 'u'.repeat(1024), authorization: `Bearer ${'k'.repeat(4096)}` } });
  assert.equal(res.status, 200, res.text());
  const rec = await recordOf(id);
  assert.equal(rec.user_id.length, 1024);
  assert.equal(rec.api_key.length, 4096);
  assert.ok(!receiver.delivered.some((r) => r.client_request_id?.startsWith('long-id-') && r.client_request_id !== id), 'a refused request was billed');
});

test('a user header or kept-whole API key that is not UTF-8: 400 invalid_request, nothing forwarded or billed', { timeout: 30_000 }, async () => {
  const before = await mockPathCount(mock, PATHS.chat);
  // Raw heads are latin1: '\xff' goes out as the byte 0xff, which no UTF-8 text holds.
  const ask = (id, header) => rawExchange(gw.port, jsonPostBytes(gw.port, PATHS.chat, chatBody('m1'), [['X-Request-Id', id], header, ['Connection', 'close']]));
  const cases = [
    [['X-User-Id', 'mallory\xff'], /'x-user-id' header: not valid UTF-8/i],
    [['X-User-Id', 'mallory\xc3('], /'x-user-id' header: not valid UTF-8/i],
    [['Authorization', 'Bearer k\xc3(ey'], /'Authorization' header: not valid UTF-8/],
    [['X-API-Key', 'k\xfe'], /'X-API-Key' header: not valid UTF-8/],
  ];
  for (const [header, message] of cases) {
    const res = await ask(nextId('bad-utf8'), header);
    assert.equal(res.status, 400, `${header}: ${res.body.toString()}`);
    const e = openAIError(res);
    assert.equal(e.code, 'invalid_request');
    assert.match(e.message, message);
  }
  assert.equal(await mockPathCount(mock, PATHS.chat), before, 'refused requests reached the backend');
  // UTF-8 as sent (the two bytes of "é") is kept whole.
  const id = nextId('utf8-ok');
  const res = await ask(id, ['X-User-Id', 'mall\xc3\xa9ory']);
  assert.equal(res.status, 200, res.body.toString());
  assert.equal((await recordOf(id)).user_id, 'malléory');
  assert.ok(!receiver.delivered.some((r) => r.client_request_id?.startsWith('bad-utf8-')), 'a refused request was billed');
});

test('a request without "model" is billed under the model the backend\'s answer names, streamed or not, with or without usage', { timeout: 30_000 }, async () => {
  for (const stream of [false, true]) {
    for (const noUsage of [false, true]) {
      const id = nextId(`no-model-${stream}-${noUsage}`);
      const res = await send(PATHS.chat, { messages: [{ role: 'user', content: 'Hello' }], stream }, { id, headers: { 'x-mock-tokens': '3', ...(noUsage ? { 'x-mock-no-usage': '1' } : {}) } });
      assert.equal(res.status, 200, res.text());
      const answered = stream ? JSON.parse(sseData(res.text())[0]).model : res.json().model;
      assert.ok(answered, 'the mock names its model');
      const rec = await recordOf(id);
      assert.equal(rec.model, answered, `stream ${stream}, no usage ${noUsage}: ${JSON.stringify(rec)}`);
      assert.equal(rec.usage_source, noUsage ? 'estimated' : 'backend');
    }
  }
  // An answer larger than the copy: its model is read from the copy's head.
  const gwSmallCopy = await startUsageGateway({ mock, receiver, usage: { max_response_copy: '1KiB' } });
  const bigId = nextId('no-model-big');
  const big = await send(PATHS.chat, { messages: [{ role: 'user', content: 'Hello' }] }, { id: bigId, to: gwSmallCopy, headers: { 'x-mock-tokens': '40000' } });
  assert.equal(big.status, 200);
  assert.ok(big.text().length > 200_000, `answer of ${big.text().length} bytes`);
  assert.equal((await recordOf(bigId)).model, big.json().model);
  // A request that names its model keeps that name, whatever the answer says.
  const id = nextId('named-model');
  assert.equal((await send(PATHS.chat, chatBody('m1'), { id })).status, 200);
  assert.equal((await recordOf(id)).model, 'm1');
});

test('usage.tokenize off: the prompt estimate of a chat with tools counts their JSON text, the calls and the template\'s tool instruction', { timeout: 30_000 }, async () => {
  const gw2 = await startUsageGateway({ mock, receiver, usage: { tokenize: false } });
  const headers = { 'x-mock-flavor': 'openai', 'x-mock-tokens': '6', 'x-mock-no-usage': '1' };
  const plainId = nextId('tools-est-plain');
  const plainMessages = TOOL_MESSAGES.map(({ tool_calls, ...m }) => ({ ...m, content: m.content ?? '' }));
  assert.equal((await send(PATHS.chat, { model: 'm1', messages: plainMessages }, { id: plainId, headers, to: gw2 })).status, 200);
  const toolsId = nextId('tools-est');
  assert.equal((await send(PATHS.chat, { model: 'm1', messages: TOOL_MESSAGES, tools: TOOLS }, { id: toolsId, headers, to: gw2 })).status, 200);
  const plain = await recordOf(plainId);
  const withTools = await recordOf(toolsId);
  assert.equal(plain.usage_source, 'estimated');
  assert.equal(withTools.usage_source, 'estimated');
  // Each tool's minified JSON, and the call's name and arguments.
  const toolBytes = TOOLS.reduce((n, t) => n + JSON.stringify(t).length, 0) + 'get_forecast'.length + TOOL_MESSAGES[1].tool_calls[0].function.arguments.length;
  const added = withTools.prompt_tokens - plain.prompt_tokens;
  // The documented rule: 3 bytes a token, + 80 for the tool instruction, + 10 per call (its
  // accuracy against real tokenizers: bench/results/estimate.md).
  assert.equal(added, Math.ceil(toolBytes / 3) + 80 + 10, `the tools added ${added} tokens for ${toolBytes} bytes of tool JSON`);
});

test('a client that hangs up mid-stream: finish "client_disconnected", estimated, 0 < completion_tokens < 200', { timeout: 30_000 }, async () => {
  const id = nextId('hangup');
  const stream = await openRawStream(
    gw.port,
    jsonPostBytes(gw.port, PATHS.chat, chatBody('m1', { stream: true }), [
      ['X-Request-Id', id],
      ['X-Mock-Tokens', '200'],
      ['X-Mock-Delay-Ms', '20'],
    ]),
  );
  await stream.until((s) => s.text.includes('tok3 '), 10_000, 'the first few events');
  stream.destroy();
  const rec = await recordOf(id, { timeout: 15_000 });
  assert.equal(rec.finish, 'client_disconnected');
  assert.equal(rec.usage_source, 'estimated');
  assert.ok(rec.completion_tokens > 0 && rec.completion_tokens < 200, `completion_tokens ${rec.completion_tokens}`);
  assert.ok(rec.prompt_tokens > 0);
  assert.equal(rec.is_stream, true);
  assert.equal(rec.status_code, 200, 'the client got a 200 before it left');
});

test('a client that hangs up while a request waits for its answer: one record, finish "client_disconnected", the prompt counted by /tokenize', { timeout: 30_000 }, async () => {
  for (const stream of [false, true]) {
    const id = nextId(`hangup-wait-${stream}`);
    const body = chatBody('m1', { stream, messages: [{ role: 'user', content: 'Count this prompt, then I hang up before any answer.' }] });
    const before = await mockPathCount(mock, PATHS.chat);
    const tokenizeBefore = await mockPathCount(mock, '/tokenize');
    const client = await openRawStream(gw.port, jsonPostBytes(gw.port, PATHS.chat, body, [['X-Request-Id', id], ['X-Mock-Ttft-Ms', '5000']]));
    await waitUntil(async () => (await mockPathCount(mock, PATHS.chat)) > before, { timeout: 10_000, what: 'the request to reach the mock' });
    client.destroy();
    const rec = await recordOf(id, { timeout: 15_000 });
    assert.equal(rec.finish, 'client_disconnected');
    assert.equal(rec.is_stream, stream);
    assert.equal(rec.usage_source, 'estimated');
    assert.equal(rec.completion_tokens, 0);
    // usage.tokenize (on by default): the prompt as the backend counts it, streamed or not.
    assert.ok((await mockPathCount(mock, '/tokenize')) > tokenizeBefore, 'the gateway did not call /tokenize');
    const tok = await postJson(mock.url, '/tokenize', { model: 'm1', messages: body.messages });
    assert.equal(rec.prompt_tokens, tok.json().count, JSON.stringify(rec));
  }
});

test('an upstream that drops the stream: one record, finish "upstream_error", the tokens relayed so far estimated', { timeout: 30_000 }, async () => {
  const id = nextId('drop');
  const res = await send(PATHS.chat, chatBody('m1', { stream: true }), { id, headers: { 'x-mock-tokens': '10', 'x-mock-drop-after': '3' } }).catch((err) => err);
  // The client sees a cut stream (an aborted response or a body without [DONE]).
  if (!(res instanceof Error)) assert.ok(!chatStreamContent(res.text()).done, 'a dropped stream ended with [DONE]');
  const rec = await recordOf(id);
  assert.equal(rec.finish, 'upstream_error');
  assert.equal(rec.is_stream, true);
  assert.equal(rec.usage_source, 'estimated');
  assert.ok(rec.completion_tokens > 0, `completion_tokens ${rec.completion_tokens}`);
});

test('backend error statuses and a dropped non-stream answer still make exactly one record each', { timeout: 30_000 }, async () => {
  const id500 = nextId('status500');
  const r500 = await send(PATHS.chat, chatBody('m1'), { id: id500, headers: { 'x-mock-status': '500' } });
  assert.equal(r500.status, 500);
  const id429 = nextId('status429');
  const r429 = await send(PATHS.chat, chatBody('m1', { stream: true }), { id: id429, headers: { 'x-mock-status': '429' } });
  assert.equal(r429.status, 429);
  const idDrop = nextId('drop-ns');
  const rDrop = await send(PATHS.chat, chatBody('m1'), { id: idDrop, headers: { 'x-mock-drop-after': '0' } });
  assert.ok(rDrop.status >= 500, `status ${rDrop.status}`);
  const rec500 = await recordOf(id500);
  assert.equal(rec500.status_code, 500);
  const rec429 = await recordOf(id429);
  assert.equal(rec429.status_code, 429);
  assert.equal(rec429.is_stream, true);
  const recDrop = await recordOf(idDrop);
  assert.equal(recDrop.status_code, rDrop.status);
  assert.equal(recDrop.finish, 'upstream_error');
});

test('first-byte and stream-idle timeouts: one record each, finish "timeout"', { timeout: 30_000 }, async () => {
  const gwT = await startUsageGateway({ mock, receiver, timeouts: { first_byte: '500ms', stream_idle: '500ms' } });
  const idFirst = nextId('timeout-first');
  const r1 = await send(PATHS.chat, chatBody('m1'), { id: idFirst, headers: { 'x-mock-ttft-ms': '5000' }, to: gwT });
  assert.ok(r1.status >= 500, `status ${r1.status}`);
  const rec1 = await recordOf(idFirst);
  assert.equal(rec1.finish, 'timeout');
  assert.equal(rec1.is_stream, false);
  assert.equal(rec1.status_code, r1.status);

  const idIdle = nextId('timeout-idle');
  const r2 = await send(PATHS.chat, chatBody('m1', { stream: true }), { id: idIdle, headers: { 'x-mock-tokens': '5', 'x-mock-delay-ms': '5000' }, to: gwT }).catch((err) => err);
  if (!(r2 instanceof Error)) assert.ok(!chatStreamContent(r2.text()).done);
  const rec2 = await recordOf(idIdle);
  assert.equal(rec2.finish, 'timeout');
  assert.equal(rec2.is_stream, true);
  assert.equal(rec2.usage_source, 'estimated');
  assert.ok(rec2.completion_tokens > 0, 'tok0 was relayed before the stream went idle');
});

test('requests the gateway refuses itself (400, 404 path, 404 model, 413, 503) make no record', { timeout: 30_000 }, async () => {
  const own = await startWebhook({ name: 'refused' });
  const sick = await startBackend('sick');
  sick.healthStatus = 500;
  const gwR = await startUsageGateway({
    mock,
    receiver: own,
    health_check: { enabled: true, interval: '200ms', timeout: '500ms', unhealthy_threshold: 2, healthy_threshold: 1 },
    backends: [backendEntry(mock, { name: 'mk', models: ['m1'] }), backendEntry(sick, { name: 'sick', models: ['m-sick'] })],
  });
  await waitUntil(async () => metricSum(await scrapeMetrics(gwR), 'llmproxy_backend_up', { backend: 'sick' }) === 0 && metricSum(await scrapeMetrics(gwR), 'llmproxy_backend_up', { backend: 'mk' }) === 1, {
    timeout: 10_000,
    what: 'sick down and mk up',
  });
  const refused = [
    ['refused-400', PATHS.chat, '{"model": "m1", "messages": [', 400],
    ['refused-404-path', '/v1/not-an-endpoint', chatBody('m1'), 404],
    ['refused-404-model', PATHS.chat, chatBody('gpt-nonexistent'), 404],
    ['refused-404-model-stream', PATHS.chat, chatBody('gpt-nonexistent', { stream: true }), 404],
    ['refused-413', PATHS.chat, JSON.stringify(chatBody('m1', { pad: 'x'.repeat(1536 * 1024) })), 413],
    ['refused-503', PATHS.chat, chatBody('m-sick'), 503],
    ['refused-503-emb', '/v1/embeddings', { model: 'm-sick', input: 'x' }, 503],
  ];
  for (const [id, path, body, status] of refused) {
    const res = await send(path, body, { id, to: gwR });
    assert.equal(res.status, status, `${id}: ${res.text().slice(0, 200)}`);
  }
  // A request that does reach a backend, after them: its record is the only one.
  const fence = nextId('fence');
  assert.equal((await send(PATHS.chat, chatBody('m1'), { id: fence, to: gwR })).status, 200);
  await recordOf(fence, { from: own });
  assert.deepEqual(own.records.map((r) => r.client_request_id), [fence]);
  assert.equal(sick.apiRequests.length, 0);
});

// ---- the ledger and the counters ----

test('`llmproxy usage --group-by user,model --format json`: totals equal the sums of the records', { timeout: 60_000 }, async () => {
  const traffic = [
    ['cli-alice', 'cli-m1', 3],
    ['cli-alice', 'cli-m2', 2],
    ['cli-bob', 'cli-m1', 1],
  ];
  const ids = [];
  for (const [user, model, n] of traffic) {
    for (let i = 0; i < n; i++) {
      const id = nextId('cli');
      ids.push(id);
      const stream = i % 2 === 1;
      const res = await send(PATHS.chat, { ...chatBody(model, { stream }), messages: [{ role: 'user', content: `hello ${'x'.repeat(i * 7)}` }] }, {
        id,
        headers: { 'x-user-id': user, 'x-mock-tokens': String(3 + i) },
      });
      assert.equal(res.status, 200);
    }
  }
  await receiver.waitFor((r) => ids.every((id) => r.deliveredByClientId(id)), 10_000, 'the cli records');
  const recs = ids.map((id) => receiver.deliveredByClientId(id));
  const r = usageCli(['--db', gw.config.usage.log_path, '--group-by', 'user,model', '--format', 'json']);
  assert.equal(r.status, 0, `exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  const report = parseJsonOutput(r.stdout);
  const users = ['cli-alice', 'cli-bob'];
  const models = ['cli-m1', 'cli-m2'];
  for (const [user, model, n] of traffic) {
    const mine = recs.filter((x) => x.user_id === user && x.model === model);
    assert.equal(mine.length, n);
    const sum = (k) => mine.reduce((a, x) => a + x[k], 0);
    // The group's row: an object in whose context this user and model appear, no other of ours.
    const rows = objectsWithContext(report).filter(
      ({ object, context }) =>
        context.includes(user) &&
        context.includes(model) &&
        !users.some((u) => u !== user && context.includes(u)) &&
        !models.some((m) => m !== model && context.includes(m)) &&
        Object.entries(object).some(([k, v]) => /prompt/i.test(k) && typeof v === 'number'),
    );
    assert.ok(rows.length > 0, `no group for ${user}/${model} in:\n${r.stdout}`);
    const row = rows[0].object;
    const num = (re) => Object.entries(row).find(([k, v]) => re.test(k) && typeof v === 'number')?.[1];
    assert.equal(num(/prompt/i), sum('prompt_tokens'), `prompt tokens of ${user}/${model}: ${JSON.stringify(row)}`);
    assert.equal(num(/completion/i), sum('completion_tokens'), `completion tokens of ${user}/${model}: ${JSON.stringify(row)}`);
    const total = num(/^total(_tokens)?$/i);
    if (total !== undefined) assert.equal(total, sum('total_tokens'));
    const count = num(/^(requests|count|records|request_count|n)$/i);
    if (count !== undefined) assert.equal(count, n);
  }
  // Wrong arguments: exit 2 and a message naming the fault, never a report.
  const refusals = [
    ['user,colour', /unknown key "colour"/],
    ['user,user', /"user" is given twice/],
    ['user,,model', /an empty key/],
    ['user,', /an empty key/],
  ];
  for (const [groupBy, why] of refusals) {
    const bad = usageCli(['--db', gw.config.usage.log_path, '--group-by', groupBy]);
    assert.equal(bad.status, 2, `--group-by ${groupBy}: exit ${bad.status}\n${bad.stdout}`);
    assert.match(bad.stderr, why, `--group-by ${groupBy}`);
    assert.equal(bad.stdout, '', `--group-by ${groupBy}`);
  }
  // A path that names no file is a wrong command line (2); a file that is no usage log is not (1).
  const missing = usageCli(['--db', `${gw.config.usage.log_path}.nope`]);
  assert.equal(missing.status, 2, missing.stderr);
  assert.match(missing.stderr, /no such file/);
  const foreign = usageCli(['--db', gw.configFile]);
  assert.equal(foreign.status, 1, foreign.stderr);
  assert.equal(foreign.stdout, '');

  // Records deleted from the log (retention, or by hand; here a copy's oldest commit group): a
  // window reaching back to them warns on stderr, or fails with --require-complete.
  const copy = `${gw.config.usage.log_path}.copy`;
  const sql = (db, text) => {
    const out = spawnSync('sqlite3', [db, text], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(out.status, 0, `sqlite3 ${text}: ${out.error ?? out.stderr}`);
    return out.stdout.trim();
  };
  sql(gw.config.usage.log_path, `.backup '${copy}'`);
  const firstStart = Number(sql(copy, 'DELETE FROM record_batches WHERE first_seq = (SELECT min(first_seq) FROM record_batches) RETURNING max_ts_ms'));
  assert.ok(firstStart > 0);
  const warned = usageCli(['--db', copy]);
  assert.equal(warned.status, 0, warned.stderr);
  assert.match(warned.stderr, /warning: records that started up to .* were deleted .* the totals cover only the records kept/);
  assert.notEqual(warned.stdout, '');
  const strict = usageCli(['--db', copy, '--require-complete', '--format', 'json']);
  assert.equal(strict.status, 1, strict.stderr);
  assert.equal(strict.stdout, '');
  assert.match(strict.stderr, /were deleted/);
  const after = new Date(firstStart + 1000).toISOString();
  const clean = usageCli(['--db', copy, '--require-complete', '--since', after]);
  assert.equal(clean.status, 0, clean.stderr);
  assert.equal(clean.stderr, '');
  const whole = usageCli(['--db', gw.config.usage.log_path, '--require-complete']);
  assert.equal(whole.status, 0, whole.stderr);
});

test('/metrics after known traffic: usage token counters equal the sums of the records, webhook successes equal deliveries', { timeout: 60_000 }, async () => {
  const own = await startWebhook({ name: 'metrics' });
  const gwM = await startUsageGateway({ mock, receiver: own });
  const before = await scrapeMetrics(gwM);
  const ids = [];
  const go = async (path, body, headers = {}) => {
    const id = nextId('metrics');
    ids.push(id);
    const res = await send(path, body, { id, headers, to: gwM });
    assert.equal(res.status, 200, res.text());
  };
  for (let i = 0; i < 5; i++) await go(PATHS.chat, chatBody('m1'), { 'x-mock-tokens': String(2 + i) });
  for (let i = 0; i < 3; i++) await go(PATHS.chat, chatBody('m1', { stream: true }), { 'x-mock-tokens': String(4 + i), 'x-mock-flavor': FLAVORS[i] });
  await go(PATHS.completions, { model: 'm1', prompt: 'complete this', stream: true, stream_options: { include_usage: true } });
  for (let i = 0; i < 2; i++) await go('/v1/embeddings', { model: 'e1', input: `embed ${i}` });
  await go(PATHS.chat, chatBody('m1'), { 'x-mock-no-usage': '1' });
  await own.waitForDelivered(ids.length, 15_000);
  const recs = own.delivered;
  assert.equal(recs.length, ids.length);
  const sum = (k) => recs.reduce((a, x) => a + x[k], 0);
  const delta = (text, name, labels) => metricSum(text, name, labels) - metricSum(before, name, labels);
  // The sender counts a success after the receiver's 2xx reached it: wait for the counter.
  let text = '';
  await waitUntil(
    async () => {
      text = await scrapeMetrics(gwM);
      return delta(text, 'llmproxy_webhook_success_total') === ids.length;
    },
    { timeout: 10_000, what: `llmproxy_webhook_success_total to reach ${ids.length}` },
  ).catch((err) => {
    throw new Error(`${err.message}; last value ${delta(text, 'llmproxy_webhook_success_total')}\n${text.split('\n').filter((l) => /webhook|usage/.test(l)).join('\n')}`);
  });
  assert.equal(delta(text, 'llmproxy_usage_tokens_total', { type: 'prompt' }), sum('prompt_tokens'));
  assert.equal(delta(text, 'llmproxy_usage_tokens_total', { type: 'completion' }), sum('completion_tokens'));
  assert.equal(delta(text, 'llmproxy_webhook_failure_total'), 0);
});

test('a report whose window ends while a request that started in it is still running is incomplete until that request is logged', { timeout: 60_000 }, async () => {
  const slow = await startBackend('slow');
  const release = deferred();
  slow.handler = async (req, res, body) => {
    if (JSON.parse(body.toString()).slow) await release.promise;
    const json = JSON.stringify({ id: 'x', object: 'chat.completion', choices: [], usage: { prompt_tokens: 7, completion_tokens: 5, total_tokens: 12 } });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
    res.end(json);
  };
  const gw = await startGateway({ backends: [backendEntry(slow, { name: 'slow' })] });
  const since = new Date(Date.now() - 1).toISOString();
  const pending = postJson(gw.url, PATHS.chat, chatBody('m1', { slow: true }), { timeout: 60_000 });
  await slow.waitForRequest((r) => r.url === PATHS.chat, 10_000, 'the slow request');
  const untilMs = Date.now() + 1;
  const until = new Date(untilMs).toISOString();
  const report = () => usageCli(['--db', gw.config.usage.log_path, '--since', since, '--until', until, '--require-complete', '--format', 'json']);
  // The quick requests below must start after the window: on a fast machine the first one was
  // sent within the same millisecond as `until` and billed in it (a fresh machine: 2 requests).
  while (Date.now() <= untilMs) await delay(1);
  // Quick requests after the window go on being logged; the window stays unsettled while the
  // slow one runs (checked for 5 s: a bound for a negative check, not a synchronisation).
  const end = Date.now() + 5_000;
  let checks = 0;
  while (Date.now() < end) {
    const quick = await postJson(gw.url, PATHS.chat, chatBody('m1'));
    assert.equal(quick.status, 200, quick.text());
    const r = report();
    assert.equal(r.status, 1, `reported complete while the request runs: ${r.stdout}`);
    assert.match(r.stderr, /only the requests that started before .* are all in the log|has not yet told up to when/);
    assert.equal(r.stdout, '');
    checks++;
    await delay(250);
  }
  assert.ok(checks >= 3);
  release.resolve();
  const res = await pending;
  assert.equal(res.status, 200, res.text());
  // Logged, and the log settled past the window: the same report is complete and bills it.
  let done;
  await waitUntil(() => {
    done = report();
    return done.status === 0;
  }, { timeout: 20_000, what: 'the report to be complete' });
  assert.equal(done.stderr, '');
  const rows = parseJsonOutput(done.stdout);
  assert.deepEqual(rows.map((r) => [r.requests, r.prompt_tokens, r.completion_tokens]), [[1, 7, 5]]);
});
