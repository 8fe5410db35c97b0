// The official OpenAI SDK as the client, through the gateway to the mock backend.
import { test, before, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startGateway,
  startMock,
  mockStats,
  mockPathCount,
  backendEntry,
  mockTokens,
  waitUntil,
} from './lib/harness.mjs';

let mock;
let gw;
let client;

before(async () => {
  mock = await startMock({ name: 'sdk', models: ['m1', 'emb1'] });
  gw = await startGateway({ backends: [backendEntry(mock, { name: 'sdk', models: ['m1', 'emb1'] })] });
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'sk-dummy-for-tests', maxRetries: 0, timeout: 15_000 });
});

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

const messages = [{ role: 'user', content: 'Say something.' }];

test('chat completion, non-stream', { timeout: 30_000 }, async () => {
  const { data, response } = await client.chat.completions
    .create({ model: 'm1', messages }, { headers: { 'X-Mock-Tokens': '8' } })
    .withResponse();
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('x-mock-backend'), 'sdk');
  assert.ok(response.headers.get('x-request-id'));
  assert.equal(data.object, 'chat.completion');
  assert.equal(data.choices.length, 1);
  assert.equal(data.choices[0].message.role, 'assistant');
  assert.equal(data.choices[0].message.content, mockTokens(8));
  assert.equal(data.usage.completion_tokens, 8);
  assert.equal(data.usage.total_tokens, data.usage.prompt_tokens + data.usage.completion_tokens);
});

test('chat completion, stream: the deltas concatenate to the mock content', { timeout: 30_000 }, async () => {
  const stream = await client.chat.completions.create(
    { model: 'm1', messages, stream: true, stream_options: { include_usage: true } },
    { headers: { 'X-Mock-Tokens': '24' } },
  );
  let content = '';
  let chunks = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, 'chat.completion.chunk');
    for (const c of chunk.choices) {
      content += c.delta?.content ?? '';
      if (c.finish_reason) finish = c.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(content, mockTokens(24));
  assert.ok(chunks >= 24, `only ${chunks} chunks`);
  assert.ok(finish, 'no finish_reason');
  assert.ok(usage, 'include_usage was asked for but no usage chunk arrived');
  assert.equal(usage.completion_tokens, 24);
});

test('aborting an SDK stream makes the gateway hang up on the backend', { timeout: 30_000 }, async () => {
  const stats = async () => (await mockStats(mock)).client_disconnects;
  const before = await stats();
  const controller = new AbortController();
  const stream = await client.chat.completions.create(
    { model: 'm1', messages, stream: true },
    { headers: { 'X-Mock-Tokens': '1000', 'X-Mock-Delay-Ms': '20' }, signal: controller.signal },
  );
  let n = 0;
  // The SDK ends the iteration quietly on abort (or throws an abort error): either is fine.
  try {
    for await (const chunk of stream) {
      if (++n === 3) controller.abort();
    }
  } catch (err) {
    assert.match(String(err?.name), /Abort/);
  }
  assert.ok(n < 1000, 'the stream was not cut');
  await waitUntil(async () => (await stats()) > before, { timeout: 5_000, what: 'the mock to see the gateway hang up' });
  const r = await client.chat.completions.create({ model: 'm1', messages }, { headers: { 'X-Mock-Tokens': '3' } });
  assert.equal(r.choices[0].message.content, mockTokens(3));
});

test('embeddings', { timeout: 30_000 }, async () => {
  const before = await mockPathCount(mock, '/v1/embeddings');
  const r = await client.embeddings.create({ model: 'emb1', input: ['hello', 'world'], encoding_format: 'float' });
  assert.equal(r.object, 'list');
  assert.equal(r.data.length, 2);
  for (const [i, e] of r.data.entries()) {
    assert.equal(e.index, i);
    assert.ok(Array.isArray(e.embedding) && e.embedding.length > 0);
    assert.ok(e.embedding.every((x) => typeof x === 'number' && Number.isFinite(x)));
  }
  assert.ok(r.usage.prompt_tokens > 0);
  // The SDK's default asks for base64 (float32, little-endian) and decodes it: the same vectors.
  const b = await client.embeddings.create({ model: 'emb1', input: ['hello', 'world'] });
  assert.deepEqual(
    b.data.map((e) => Array.from(e.embedding)),
    r.data.map((e) => e.embedding),
  );
  assert.equal(await mockPathCount(mock, '/v1/embeddings'), before + 2);
});

test('the SDK sees gateway errors as typed API errors', { timeout: 30_000 }, async () => {
  await assert.rejects(client.chat.completions.create({ model: 'no-such-model', messages }), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 404);
    assert.equal(err.code, 'model_not_found');
    return true;
  });
  await assert.rejects(
    client.chat.completions.create({ model: 'm1', messages }, { headers: { 'X-Mock-Status': '429' } }),
    (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError, `got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 429);
      return true;
    },
  );
  // A field of the wrong type: BadRequestError whose param names the field.
  await assert.rejects(client.chat.completions.create({ model: 'm1', messages, user: 7 }), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.code, 'invalid_request');
    assert.equal(err.param, 'user');
    return true;
  });
});

test('models list', { timeout: 30_000 }, async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids.sort(), ['emb1', 'm1']);
});

test('models retrieve: a served model (an id with a slash too), and 404 model_not_found', { timeout: 30_000 }, async () => {
  const gw2 = await startGateway({ backends: [backendEntry(mock, { name: 'sdk', models: ['m1', 'org/m-2'] })] });
  const client2 = new OpenAI({ baseURL: `${gw2.url}/v1`, apiKey: 'sk-dummy-for-tests', maxRetries: 0, timeout: 15_000 });
  for (const id of ['m1', 'org/m-2']) {
    const m = await client2.models.retrieve(id);
    assert.deepEqual({ ...m }, { id, object: 'model', created: 0, owned_by: 'sdk' });
  }
  // Percent-encoded as the SDKs may send it; a malformed escape is no model.
  assert.equal((await (await fetch(`${gw2.url}/v1/models/org%2Fm-2`)).json()).id, 'org/m-2');
  assert.equal((await fetch(`${gw2.url}/v1/models/org%2`)).status, 404);
  await assert.rejects(client2.models.retrieve('emb1'), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, String(err));
    assert.equal(err.code, 'model_not_found');
    return true;
  });
});

// Streams `headers` through `client` and expects the SDK to raise an APIError of `code` whose
// message matches `message`; returns the content that arrived before it.
async function streamUntilApiError(client, headers, code, message) {
  const stream = await client.chat.completions.create({ model: 'm1', messages, stream: true }, { headers });
  let content = '';
  await assert.rejects(
    (async () => {
      for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? '';
    })(),
    (err) => {
      assert.ok(err instanceof OpenAI.APIError, `${err?.constructor?.name}: ${err}`);
      assert.equal(err.code, code);
      assert.match(err.message, message);
      return true;
    },
  );
  return content;
}

test('a stream the backend breaks off between events ends with an error event the SDK raises', { timeout: 30_000 }, async () => {
  const client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'sk-dummy-for-tests', maxRetries: 0, timeout: 15_000 });
  const content = await streamUntilApiError(
    client,
    { 'X-Mock-Tokens': '10', 'X-Mock-Drop-After': '3' },
    'upstream_error',
    /broke off before its end/,
  );
  assert.ok(content.length > 0 && !content.includes('tok4'), `content ${JSON.stringify(content)}`);
});

test('a stream the gateway ends at stream_idle ends with an error event the SDK raises', { timeout: 30_000 }, async () => {
  const gw2 = await startGateway({
    timeouts: { stream_idle: '300ms' },
    backends: [backendEntry(mock, { name: 'sdk', models: ['m1'] })],
  });
  const client2 = new OpenAI({ baseURL: `${gw2.url}/v1`, apiKey: 'sk-dummy-for-tests', maxRetries: 0, timeout: 15_000 });
  const content = await streamUntilApiError(
    client2,
    { 'X-Mock-Tokens': '5', 'X-Mock-Delay-Ms': '3000' },
    'upstream_timeout',
    /stream_idle/,
  );
  assert.ok(!content.includes('tok4'), 'the stream was not cut');
});
