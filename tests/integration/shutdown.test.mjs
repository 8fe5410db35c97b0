// SIGTERM: the listener closes at once, in-flight streams run to their end (within the drain
// timeout), and the process exits 0.
import { test, after, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  cleanup,
  checkProcesses,
  trackTest,
  startGateway,
  startMock,
  backendEntry,
  connect,
  openRawStream,
  jsonPostBytes,
  chatBody,
  postJson,
  keepAliveAgent,
  waitUntil,
  chatStreamContent,
  mockTokens,
} from './lib/harness.mjs';

beforeEach(trackTest);
afterEach(checkProcesses);
after(cleanup);

async function refusesConnections(port) {
  try {
    const s = await connect(port);
    s.destroy();
    return false;
  } catch (err) {
    return err.code === 'ECONNREFUSED';
  }
}

// A 30 s stream (100 tokens, 300 ms apart) through `gw`, once its first token has arrived.
async function openLongStream(gw) {
  const stream = await openRawStream(
    gw.port,
    jsonPostBytes(gw.port, '/v1/chat/completions', chatBody('m1', { stream: true }), [
      ['X-Mock-Tokens', '100'],
      ['X-Mock-Delay-Ms', '300'],
    ]),
  );
  await stream.until((s) => s.text.includes('tok0 '), 10_000, 'the first token');
  return stream;
}

test('SIGTERM during a slow stream: the stream finishes with [DONE], new connections are refused, exit 0', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'slow' });
  const gw = await startGateway({ server: { drain_timeout: '20s' }, backends: [backendEntry(mock, { name: 'slow' })] });
  const tokens = 20;
  const stream = await openRawStream(
    gw.port,
    jsonPostBytes(gw.port, '/v1/chat/completions', chatBody('m1', { stream: true }), [
      ['X-Mock-Tokens', String(tokens)],
      ['X-Mock-Delay-Ms', '200'],
    ]),
  );
  await stream.until((s) => s.text.includes('tok0 '), 10_000, 'the first token');
  gw.signal('SIGTERM');
  await waitUntil(() => refusesConnections(gw.port), { timeout: 5_000, interval: 20, what: 'the listener to close' });
  assert.ok(!stream.ended, 'the stream ended before the listener closed: make it slower');
  await stream.until((s) => s.ended, 20_000, 'the drained stream to end');
  assert.equal(stream.head.status, 200);
  const { content, done } = chatStreamContent(stream.text);
  assert.equal(content, mockTokens(tokens));
  assert.ok(done, 'no [DONE] after SIGTERM');
  const exit = await gw.waitExit(10_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
  assert.ok(await refusesConnections(gw.port));
});

test('SIGTERM with an idle keep-alive client connection exits 0 without waiting for the client', { timeout: 30_000 }, async () => {
  const mock = await startMock({ name: 'idle' });
  const gw = await startGateway({ server: { drain_timeout: '20s' }, backends: [backendEntry(mock, { name: 'idle' })] });
  const agent = keepAliveAgent();
  const res = await postJson(gw.url, '/v1/chat/completions', chatBody('m1'), { agent });
  assert.equal(res.status, 200);
  // The agent now holds an idle connection to the gateway.
  gw.signal('SIGTERM');
  // Well inside the 20 s drain timeout: an idle connection is not in-flight work.
  const exit = await gw.waitExit(10_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
});

test('SIGTERM with no traffic exits 0', { timeout: 30_000 }, async () => {
  const mock = await startMock({ name: 'idle' });
  const gw = await startGateway({ backends: [backendEntry(mock, { name: 'idle' })] });
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(10_000);
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
});

test('a stream longer than drain_timeout is cut and the process still exits', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'long' });
  const gw = await startGateway({ server: { drain_timeout: '1s' }, backends: [backendEntry(mock, { name: 'long' })] });
  const stream = await openLongStream(gw);
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(15_000);
  // Cut or not, the exit is clean: 0, and no sanitizer report (which would make it non-zero).
  assert.deepEqual(exit, { code: 0, signal: null }, gw.describe());
  await stream.until((s) => s.ended || s.socket.destroyed, 5_000, 'the client connection to close').catch(() => {});
  assert.ok(!chatStreamContent(stream.text.replace(/[^\n]*$/, '')).done, 'a 30 s stream completed within a 1 s drain');
});

test('a second SIGTERM stops at once: the requests it cuts are said in the log and the exit status is 3', { timeout: 60_000 }, async () => {
  const mock = await startMock({ name: 'long' });
  const gw = await startGateway({ server: { drain_timeout: '20s' }, backends: [backendEntry(mock, { name: 'long' })] });
  const stream = await openLongStream(gw);
  gw.signal('SIGTERM');
  await waitUntil(() => /draining/.test(gw.stderr), { timeout: 5_000, interval: 20, what: 'the drain to begin' });
  gw.signal('SIGTERM');
  const exit = await gw.waitExit(15_000);
  // A supervisor must not read a stop that lost usage records as a clean one.
  assert.deepEqual(exit, { code: 3, signal: null }, gw.describe());
  assert.match(gw.stderr, /second signal: stopping now/);
  assert.match(gw.stderr, /stopped with 1 request in flight: cut without usage records/);
  assert.ok(!chatStreamContent(stream.text.replace(/[^\n]*$/, '')).done);
});
