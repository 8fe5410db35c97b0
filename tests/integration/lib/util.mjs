// Small async helpers shared by the integration tests: every wait has a deadline.
import { setTimeout as delay } from 'node:timers/promises';

export { delay };

// A promise with its resolve/reject exposed, for coordinating a test client with a test backend.
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

// Resolves like `promise`, or rejects once `ms` have passed; the timer never outlives the race.
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Polls `condition` until it returns a truthy value or the deadline passes. Only for states that
// raise no event we could wait on (a health checker's verdict, a counter in another process).
export async function waitUntil(condition, { timeout = 10_000, interval = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    try {
      const value = await condition();
      if (value) return value;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) {
      const detail = lastError ? ` (last error: ${lastError.message})` : '';
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${detail}`);
    }
    await delay(interval);
  }
}

// Deterministic filler text so large bodies are reproducible and not trivially compressible.
export function fillerText(length, seed = 1) {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;';
  let x = seed >>> 0 || 1;
  const out = new Array(length);
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = alphabet[x % alphabet.length];
  }
  return out.join('');
}

// The mock backend's deterministic stream content for N tokens: "tok0 tok1 ... tokN-1 ".
export function mockTokens(n) {
  let s = '';
  for (let i = 0; i < n; i++) s += `tok${i} `;
  return s;
}

// Listens on 127.0.0.1:`port` (0: an ephemeral port); resolves with the port it got.
export function listenLoopback(server, port = 0) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

// Stops listening and drops every open connection, hung requests included (the port is
// refused until it listens again).
export async function closeServer(server, sockets, what) {
  const closed = new Promise((resolve) => server.close(() => resolve()));
  for (const s of sockets) s.destroy();
  server.closeAllConnections?.();
  await withTimeout(closed, 5_000, `${what} to close`);
}
