#!/usr/bin/env node
// bench/usage-tools.mjs: the small helpers of bench/usage.sh (node:http only, no dependencies).
//
//   node usage-tools.mjs receiver [--port P]
//       A webhook receiver that is cheap enough to share a core with the load: keep-alive,
//       counts records (a JSON array counts its elements, an object counts one), answers 200
//       with an empty body. Prints "usage-receiver: listening on http://127.0.0.1:PORT at MS"
//       (MS: Unix ms when it began to accept). GET /stats -> flat JSON {posts, records, unique,
//       duplicates, bad_bodies, bytes, first_post_ms, last_post_ms, cpu_at_first_post_s, cpu_s}
//       (cpu: the receiver's own CPU seconds so far); the same line is
//       printed on SIGTERM/SIGINT before it exits.
//   node usage-tools.mjs snap URL
//       One /metrics snapshot of the usage counters as one flat JSON line.
//   node usage-tools.mjs settle URL [--timeout-ms T] [--expect-success N] [--since MS] [--queue-only]
//       Polls /metrics every 100 ms until the usage queue is empty, every sink's backlog is 0
//       (not with --queue-only) and (with --expect-success) llmproxy_webhook_success_total == N. Prints the last snapshot
//       plus settled, polls and done_ms (Unix ms of the poll that saw it) and, with --since,
//       elapsed_ms = done_ms - since. Exit 1 when T passes first (default 5000 ms).
//   node usage-tools.mjs watch URL [--interval-ms 100]
//       Polls /metrics until SIGTERM/SIGINT, prints {samples, max_queue_depth,
//       max_sink_backlog, failed_polls, cpu_s}. Prints "ready" on stderr after its first sample.
//
// Unix ms come from performance.timeOrigin + performance.now() (the wall clock, like `date`).
import http from 'node:http';
import { performance } from 'node:perf_hooks';

const nowMs = () => performance.timeOrigin + performance.now();
const cpuS = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

function option(args, name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const v = args[i + 1];
  if (v === undefined) throw new Error(`${name} needs a value`);
  return v;
}

// ---------------------------------------------------------------------------------------------
// receiver

function receiver(args) {
  const port = Number(option(args, '--port', '0'));
  const st = { posts: 0, records: 0, unique: 0, duplicates: 0, bad_bodies: 0, bytes: 0, first_post_ms: null, last_post_ms: null, cpu_at_first_post_s: null };
  const seen = new Set();
  const stats = () => JSON.stringify({ ...st, cpu_s: Number(cpuS().toFixed(3)) });

  const server = http.createServer({ keepAliveTimeout: 120_000, headersTimeout: 130_000 }, (req, res) => {
    if (req.method === 'GET' && req.url === '/stats') {
      const body = stats();
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      chunks.push(c);
      size += c.length;
    });
    req.on('end', () => {
      const t = nowMs();
      st.posts++;
      st.bytes += size;
      if (st.first_post_ms === null) {
        st.first_post_ms = Math.round(t);
        st.cpu_at_first_post_s = Number(cpuS().toFixed(3));
      }
      st.last_post_ms = Math.round(t);
      try {
        const parsed = JSON.parse(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size));
        const list = Array.isArray(parsed) ? parsed : [parsed];
        for (const r of list) {
          st.records++;
          const id = r && typeof r.request_id === 'string' ? r.request_id : null;
          if (id === null) st.bad_bodies++;
          else if (seen.has(id)) st.duplicates++;
          else {
            seen.add(id);
            st.unique++;
          }
        }
      } catch {
        st.bad_bodies++;
      }
      res.writeHead(200, { 'Content-Length': 0 });
      res.end();
    });
  });
  const stop = () => {
    process.stdout.write(stats() + '\n');
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.listen(port, '127.0.0.1', () => {
    const p = server.address().port;
    process.stdout.write(`usage-receiver: listening on http://127.0.0.1:${p} at ${Math.round(nowMs())}\n`);
  });
}

// ---------------------------------------------------------------------------------------------
// /metrics

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function getMetrics(base) {
  return new Promise((resolve, reject) => {
    const req = http.get(`${base}/metrics`, { agent, timeout: 2000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c) => (text += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(text) : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

// The counters usage.sh needs, summed over label sets where a family has several.
function snapshot(text) {
  const s = {
    queue_depth: 0, log_records: 0, log_commits: 0, webhook_success: 0, webhook_failure: 0,
    sink_backlog: 0, sinks: 0, requests: 0, records_backend: 0, records_estimated: 0,
    records_dropped: 0, backlog_rejected: 0,
  };
  for (const line of text.split('\n')) {
    if (!line.startsWith('llmproxy_')) continue;
    const sp = line.lastIndexOf(' ');
    const key = line.slice(0, sp);
    const v = Number(line.slice(sp + 1));
    const name = key.replace(/\{.*$/, '');
    switch (name) {
      case 'llmproxy_usage_queue_depth': s.queue_depth += v; break;
      case 'llmproxy_usage_log_records_total': s.log_records += v; break;
      case 'llmproxy_usage_log_commits_total': s.log_commits += v; break;
      case 'llmproxy_webhook_success_total': s.webhook_success += v; break;
      case 'llmproxy_webhook_failure_total': s.webhook_failure += v; break;
      case 'llmproxy_usage_sink_backlog': s.sink_backlog += v; s.sinks++; break;
      case 'llmproxy_requests_total':
        // LLM requests only: /metrics polls are counted too, under their own path.
        if (key.includes('path="/v1/')) s.requests += v;
        break;
      case 'llmproxy_usage_records_dropped_total': s.records_dropped += v; break;
      case 'llmproxy_usage_backlog_rejected_total': s.backlog_rejected += v; break;
      case 'llmproxy_usage_records_total':
        if (key.includes('source="backend"')) s.records_backend += v;
        else if (key.includes('source="estimated"')) s.records_estimated += v;
        break;
      default: break;
    }
  }
  return s;
}

async function snap(args) {
  const s = snapshot(await getMetrics(args[0]));
  process.stdout.write(JSON.stringify({ ...s, at_ms: Math.round(nowMs()) }) + '\n');
}

async function settle(args) {
  const base = args[0];
  const timeout = Number(option(args, '--timeout-ms', '5000'));
  const expect = option(args, '--expect-success', null);
  const since = option(args, '--since', null);
  const queueOnly = args.includes('--queue-only');
  const t0 = nowMs();
  let polls = 0;
  let last = null;
  let lastError = null;
  for (;;) {
    const t = nowMs();
    try {
      last = snapshot(await getMetrics(base));
      polls++;
      const ok = last.queue_depth === 0 && (queueOnly || last.sink_backlog === 0) &&
        (expect === null || last.webhook_success === Number(expect));
      if (ok) {
        const done = Math.round(nowMs());
        const out = { ...last, settled: true, polls, done_ms: done };
        if (since !== null) out.elapsed_ms = done - Number(since);
        process.stdout.write(JSON.stringify(out) + '\n');
        return;
      }
    } catch (e) {
      lastError = e.message;
    }
    if (nowMs() - t0 >= timeout) {
      process.stdout.write(JSON.stringify({ ...(last ?? {}), settled: false, polls, last_error: lastError }) + '\n');
      process.exit(1);
    }
    const wait = 100 - (nowMs() - t);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}

async function watch(args) {
  const base = args[0];
  const interval = Number(option(args, '--interval-ms', '100'));
  const out = { samples: 0, max_queue_depth: 0, max_sink_backlog: 0, failed_polls: 0 };
  let stopping = false;
  const finish = () => {
    stopping = true;
  };
  process.on('SIGTERM', finish);
  process.on('SIGINT', finish);
  let first = true;
  while (!stopping) {
    const t = nowMs();
    try {
      const s = snapshot(await getMetrics(base));
      out.samples++;
      out.max_queue_depth = Math.max(out.max_queue_depth, s.queue_depth);
      out.max_sink_backlog = Math.max(out.max_sink_backlog, s.sink_backlog);
    } catch {
      out.failed_polls++;
    }
    if (first) {
      process.stderr.write('ready\n');
      first = false;
    }
    const wait = interval - (nowMs() - t);
    if (wait > 0 && !stopping) await new Promise((r) => setTimeout(r, wait));
  }
  process.stdout.write(JSON.stringify({ ...out, cpu_s: Number(cpuS().toFixed(3)) }) + '\n');
  process.exit(0);
}

const [cmd, ...rest] = process.argv.slice(2);
const commands = { receiver, snap, settle, watch };
if (!commands[cmd]) {
  process.stderr.write('usage: usage-tools.mjs receiver|snap|settle|watch ...\n');
  process.exit(2);
}
Promise.resolve(commands[cmd](rest)).catch((e) => {
  process.stderr.write(`usage-tools ${cmd}: ${e.message}\n`);
  process.exit(1);
});
