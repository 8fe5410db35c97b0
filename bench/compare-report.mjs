// bench/compare-report.mjs OUT: the tables of bench/compare.sh. Reads OUT/compare/ (runs.jsonl: one
// JSON line per load run, the loadgen's object plus identity, CPU and RSS; memory.jsonl; peers.json;
// machine.md; params.json) and writes OUT/compare.md, OUT/compare/runs.csv and memory.csv (one row
// per run and peer, with the per-run ratios and the differences to direct), and the gnuplot data
// (throughput.dat, ttft.dat, memory.dat). Node built-ins only.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

const out = process.argv[2];
if (!out) throw new Error('usage: compare-report.mjs OUT');
const raw = join(out, 'compare');
const lines = (f) =>
  existsSync(join(raw, f))
    ? readFileSync(join(raw, f), 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l))
    : [];
const runs = lines('runs.jsonl');
const mem = lines('memory.jsonl');
const memIdle = lines('memory-idle.jsonl');
const peers = JSON.parse(readFileSync(join(raw, 'peers.json'), 'utf8'));
const params = JSON.parse(readFileSync(join(raw, 'params.json'), 'utf8'));
const machine = readFileSync(join(raw, 'machine.md'), 'utf8').trim();
const logLines = existsSync(join(raw, 'peer-log-lines.txt')) ? readFileSync(join(raw, 'peer-log-lines.txt'), 'utf8').trim() : '';

const ORDER = ['direct', 'llmproxy', 'llmproxy-metered', 'llmproxy-hooked', 'nginx', 'portkey'];
// The peers of (5): LLMProxy with metering on, measured only in (1) and at the first stream level.
const METERED = ['llmproxy-metered', 'llmproxy-hooked'];
const LABEL = {
  direct: 'direct (mock)',
  llmproxy: 'LLMProxy',
  'llmproxy-metered': 'LLMProxy, metering on',
  'llmproxy-hooked': 'LLMProxy, metering + webhook',
  nginx: 'nginx',
  portkey: 'Portkey',
};
const peerList = params.peers.split(/\s+/).filter(Boolean).sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
const RUNS = params.runs;

// --- helpers ---------------------------------------------------------------------------------------
const num = (x) => (x === null || x === undefined || Number.isNaN(x) ? null : x);
const median = (xs) => {
  const v = xs.filter((x) => num(x) !== null).sort((a, b) => a - b);
  if (!v.length) return null;
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};
const min = (xs) => { const v = xs.filter((x) => num(x) !== null); return v.length ? Math.min(...v) : null; };
const max = (xs) => { const v = xs.filter((x) => num(x) !== null); return v.length ? Math.max(...v) : null; };
const f = (x, d = 1) => (num(x) === null ? '-' : Number(x).toFixed(d));
const fi = (x) => (num(x) === null ? '-' : Math.round(x).toLocaleString('en-US'));
// "median (min–max)" over runs; only the median when there is one run.
const spread = (xs, d = 1, int = false) => {
  const m = median(xs);
  if (m === null) return '-';
  const fmt = int ? fi : (x) => f(x, d);
  const v = xs.filter((x) => num(x) !== null);
  return v.length > 1 ? `${fmt(m)} (${fmt(min(v))}–${fmt(max(v))})` : fmt(m);
};
const ratio = (a, b) => (num(a) === null || num(b) === null || b === 0 ? null : a / b);
const diff = (a, b) => (num(a) === null || num(b) === null ? null : a - b);
const pct = (a, w) => (num(a) === null || !w ? null : (100 * a) / w);

const ok = (r) => r && !r.failed;
const get = (scen, cas, peer, run) => runs.find((r) => r.scenario === scen && r.case === cas && r.peer === peer && r.run === run);
const runsOf = (scen, cas, peer) => {
  const out = [];
  for (let i = 1; i <= RUNS; i++) out.push(get(scen, cas, peer, i));
  return out;
};
const casesOf = (scen) => [...new Set(runs.filter((r) => r.scenario === scen).map((r) => r.case))];

// Derived per load run.
function derive(r) {
  if (!ok(r)) return {};
  const served = (r.requests || 0) + (r.warmup_requests || 0);
  const non200 = Object.entries(r.status_counts || {}).filter(([k]) => k !== '200').reduce((s, [, v]) => s + v, 0);
  const ours0 = r.proxy_cpu_s ?? 0;
  const ours1 = (r.mock_cpu_s ?? 0) + (r.loadgen_cpu_s ?? 0);
  return {
    served,
    non200,
    cpu_us_per_req: r.proxy_cpu_s === null || !served ? null : (1e6 * r.proxy_cpu_s) / served,
    proxy_cpu_pct: r.proxy_cpu_s === null ? null : pct(r.proxy_cpu_s, r.wall_s),
    mock_cpu_pct: pct(r.mock_cpu_s, r.wall_s),
    loadgen_cpu_pct: pct(r.loadgen_cpu_s, r.wall_s),
    cpu0_all_pct: pct(r.cpu0_busy_s + r.cpu0_irq_s, r.wall_s),
    cpu1_all_pct: pct(r.cpu1_busy_s + r.cpu1_irq_s, r.wall_s),
    others0_pct: pct(Math.max(0, r.cpu0_busy_s - ours0), r.wall_s),
    others1_pct: pct(Math.max(0, r.cpu1_busy_s - ours1), r.wall_s),
    coalesced_per_stream: r.mode === 'stream' && r.requests ? r.coalesced_reads / r.requests : null,
    // Older load generators did not count reads with several events other than [DONE].
    coalesced_data_per_stream:
      r.mode === 'stream' && r.requests && r.coalesced_data_reads !== undefined ? r.coalesced_data_reads / r.requests : null,
  };
}
const D = new Map(runs.map((r) => [r, derive(r)]));
const d = (r, k) => (ok(r) ? D.get(r)[k] : null);
const v = (r, path) => {
  if (!ok(r)) return null;
  let x = r;
  for (const p of path.split('.')) x = x?.[p];
  return num(x ?? null);
};

const status = (peer) => peers[peer] || { status: 'not run', reason: 'not in PEERS' };
const failedNote = (peer) => {
  const s = status(peer);
  return s.status === 'ok' ? '' : ` **FAILED: ${String(s.reason || '').replace(/\|/g, '/').slice(0, 300)}**`;
};
const peerRows = (scen, cas) => peerList.filter((p) => runs.some((r) => r.scenario === scen && r.case === cas && r.peer === p));

// --- runs.csv ----------------------------------------------------------------------------------------
const MAIN = { ns_closed: 'rps', ns_rate: 'latency_ms.p99', stream: 'ttft_ms.p99', prompt: 'latency_ms.p50' };
{
  const cols = ['scenario', 'case', 'peer', 'run', 'failed', 'rate_asked', 'prompt_bytes', 'concurrency', 'requests',
    'warmup_requests', 'errors', 'non200', 'rps', 'lat_p50_ms', 'lat_p99_ms', 'ttft_p50_ms', 'ttft_p99_ms', 'gap_p50_ms',
    'gap_p99_ms', 'streams_done', 'events', 'coalesced_reads', 'coalesced_per_stream', 'coalesced_data_per_stream', 'send_lag_p99_ms', 'wall_s',
    'proxy_cpu_s', 'proxy_cpu_pct', 'proxy_cpu_us_per_req', 'mock_cpu_pct', 'loadgen_cpu_pct', 'cpu0_all_pct',
    'cpu1_all_pct', 'others_cpu0_pct', 'others_cpu1_pct', 'proxy_rss_kib', 'main_metric', 'added_vs_direct',
    'ratio_to_llmproxy'];
  const rows = [cols.join(',')];
  for (const r of runs) {
    const m = MAIN[r.scenario];
    const val = v(r, m);
    const dir = v(get(r.scenario, r.case, 'direct', r.run), m);
    const lp = v(get(r.scenario, r.case, 'llmproxy', r.run), m);
    const row = [r.scenario, r.case, r.peer, r.run, r.failed ? JSON.stringify(r.failed) : '', r.rate_asked ?? '',
      r.prompt_bytes ?? '', r.concurrency ?? '', r.requests ?? '', r.warmup_requests ?? '', r.errors ?? '', d(r, 'non200') ?? '',
      v(r, 'rps'), v(r, 'latency_ms.p50'), v(r, 'latency_ms.p99'), v(r, 'ttft_ms.p50'), v(r, 'ttft_ms.p99'),
      v(r, 'gap_ms.p50'), v(r, 'gap_ms.p99'), r.streams_done ?? '', r.events ?? '', r.coalesced_reads ?? '',
      f(d(r, 'coalesced_per_stream'), 3), f(d(r, 'coalesced_data_per_stream'), 3), v(r, 'send_lag_ms.p99'), r.wall_s ?? '', r.proxy_cpu_s ?? '',
      f(d(r, 'proxy_cpu_pct'), 1), f(d(r, 'cpu_us_per_req'), 2), f(d(r, 'mock_cpu_pct'), 1), f(d(r, 'loadgen_cpu_pct'), 1),
      f(d(r, 'cpu0_all_pct'), 1), f(d(r, 'cpu1_all_pct'), 1), f(d(r, 'others0_pct'), 1), f(d(r, 'others1_pct'), 1),
      r.proxy_rss_kib ?? '', m, r.peer === 'direct' ? '' : f(diff(val, dir), 3), f(ratio(val, lp), 4)];
    rows.push(row.map((x) => (x === null || x === '-' ? '' : x)).join(','));
  }
  writeFileSync(join(raw, 'runs.csv'), rows.join('\n') + '\n');
}

// --- tables ----------------------------------------------------------------------------------------
const md = [];
const P = (s = '') => md.push(s);
const quick = params.quick;

P('# LLMProxy side by side: direct, nginx, Portkey');
P();
if (quick) {
  P('> **SMOKE RUN (`QUICK=1`): a few seconds per scenario, one run, a small memory ramp. It proves the');
  P('> harness works end to end; its numbers are not results.**');
  P();
}
P(`Produced by \`${params.command}\` (${RUNS} run${RUNS > 1 ? 's' : ''}, the peers interleaved in an order rotated every run;`);
P(`${Math.round(params.total_s / 60)} minutes). Raw data: \`${raw}/\` (\`runs.jsonl\`: one JSON line per load run, the load`);
P('generator\'s output plus the CPU and memory of the processes; `runs.csv` / `memory.csv`: the same per run,');
P('with each run\'s differences to direct and ratios to LLMProxy). The configurations used are there too');
P('(`llmproxy.yaml`, `llmproxy-metered.yaml`, `llmproxy-hooked.yaml`, `nginx.conf`; template `bench/nginx/nginx.conf.template`;');
P('Portkey: `bench/portkey/package.json` + `package-lock.json`). Plot: `compare.png`.');
P();
P('| machine | |');
P('|---|---|');
P(machine);
P();
P('## Peers');
P();
P('| peer | how it ran | status |');
P('|---|---|---|');
const HOW = {
  direct: 'the mock backend (`llmproxy-mock`, 1 thread, on CPU 1) requested directly: the ceiling',
  llmproxy: `\`build/llmproxy\`, ${params.lp_workers} worker, \`access_log: false\`, \`usage: {enabled: false}\`, health checks off, \`max_connections: 20000\``,
  'llmproxy-metered': 'the same with usage metering on (defaults: records to a SQLite log in a temp dir, durability disk, no webhook)',
  'llmproxy-hooked': 'the same plus `usage_hook` (`batch_size: 100`, `batch_interval: 200ms`) to the mock\'s own receiver, `POST /mock/usage` (C++, on CPU 1 with the mock): the webhook sink\'s thread runs on CPU 0 with the gateway',
  nginx: `Debian's nginx, \`bench/nginx/nginx.conf.template\`: ${params.lp_workers} worker process, upstream keepalive 64, HTTP/1.1, \`Connection ""\`, \`proxy_buffering off\`, \`proxy_request_buffering off\`, access log off`,
  portkey: '`@portkey-ai/gateway` (bench/portkey, `npm ci`), `node build/start-server.js --port=0 --headless`, `NODE_ENV=production`, bound to 127.0.0.1 by `bench/portkey/loopback.cjs`; each request carries `x-portkey-provider: openai`, `x-portkey-custom-host: <mock>/v1`, a dummy `Authorization` and `x-portkey-forward-headers: x-mock-tokens,x-mock-delay-ms,x-mock-ttft-ms` (Portkey drops other request headers, and the `mock` body field, so the mock\'s controls must be forwarded by name); `TRUSTED_CUSTOM_HOSTS=127.0.0.1,localhost` (its default list already has them) lets the loopback custom host pass its SSRF check',
};
for (const p of peerList) {
  const s = status(p);
  P(`| ${LABEL[p]} | ${HOW[p]} | ${s.status === 'ok' ? 'ok' : `**FAILED**: ${String(s.reason || '').replace(/\|/g, '/').slice(0, 400)}`}${s.memory_failure ? ` (memory runs: ${String(s.memory_failure).replace(/\|/g, '/').slice(0, 300)})` : ''} |`);
}
P();
P('Every proxy is pinned to CPU 0 (all its processes and threads), alone; the mock and the load generator');
P('share CPU 1. "Proxy CPU %" is the proxy\'s utime+stime over the wall time of the load run; "CPU µs/req" the same');
P('CPU time divided by every request it served in the run (warmup included). "CPU 1 busy" counts everything');
P('CPU 1 did (softirqs included, which /proc/PID/stat charges to nobody): near 100 % the load side, not the');
P('proxy, is the limit, and the proxy\'s number is a lower bound. "Other processes" is CPU time on CPU 0 / CPU 1');
P('beyond our processes (+ hypervisor steal): other work on this machine. Values are medians over runs with');
P('(min–max); ratios are computed per run, then their median is reported.');
P();

// (1a)
const nsCase = casesOf('ns_closed')[0];
if (nsCase) {
  P(`## (1) Non-stream chat: maximum throughput (closed loop, ${params.ns_concurrency} connections)`);
  P();
  P(`Small body (the load generator's default chat request), ${params.ns_duration_s} s measured after ${params.warmup_s} s of warmup.`);
  P();
  P('| peer | req/s | **peer / LLMProxy** | latency p50 / p99 ms | proxy CPU % | proxy CPU µs/req | mock CPU % | loadgen CPU % | CPU 1 busy | other processes CPU 0 / CPU 1 | errors / non-200 |');
  P('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const p of peerRows('ns_closed', nsCase)) {
    const rs = runsOf('ns_closed', nsCase, p);
    const lp = runsOf('ns_closed', nsCase, 'llmproxy');
    const rat = rs.map((r, i) => ratio(v(r, 'rps'), v(lp[i], 'rps')));
    P(`| ${LABEL[p]}${failedNote(p)} | ${spread(rs.map((r) => v(r, 'rps')), 0, true)} | **${p === 'llmproxy' ? '1' : spread(rat, 3)}** | ${f(median(rs.map((r) => v(r, 'latency_ms.p50'))), 3)} / ${f(median(rs.map((r) => v(r, 'latency_ms.p99'))), 3)} | ${f(median(rs.map((r) => d(r, 'proxy_cpu_pct'))), 0)} | ${spread(rs.map((r) => d(r, 'cpu_us_per_req')), 1)} | ${f(median(rs.map((r) => d(r, 'mock_cpu_pct'))), 0)} | ${f(median(rs.map((r) => d(r, 'loadgen_cpu_pct'))), 0)} | ${f(median(rs.map((r) => d(r, 'cpu1_all_pct'))), 0)} % | ${f(median(rs.map((r) => d(r, 'others0_pct'))), 0)} / ${f(median(rs.map((r) => d(r, 'others1_pct'))), 0)} % | ${rs.reduce((s, r) => s + (ok(r) ? r.errors : 0), 0)} / ${rs.reduce((s, r) => s + (d(r, 'non200') || 0), 0)}${rs.some((r) => r && r.failed) ? ' (load run failed)' : ''} |`);
  }
  P();
}

// (1b)
const rateCase = casesOf('ns_rate')[0];
if (rateCase) {
  P(`## (1) Non-stream chat: latency at a fixed rate (open loop, ${params.ns_rate} req/s asked)`);
  P();
  P(`${params.ns_rate_concurrency} connections, ${params.ns_rate_duration_s} s after ${params.warmup_s} s of warmup; latency from the *scheduled* send time (no`);
  P('coordinated omission). A peer whose closed-loop maximum in the same run was below twice this rate is');
  P('driven at half its maximum instead ("rate" column): the rate must stay below saturation. "Added" = peer');
  P('minus direct in the same run (direct at the common rate).');
  P();
  P('| peer | rate req/s | achieved req/s | latency p50 / p99 ms | **added p50 / p99 ms** | added p99 peer / LLMProxy | proxy CPU % | proxy CPU µs/req | errors / non-200 |');
  P('|---|---|---|---|---|---|---|---|---|');
  for (const p of peerRows('ns_rate', rateCase)) {
    const rs = runsOf('ns_rate', rateCase, p);
    const dr = runsOf('ns_rate', rateCase, 'direct');
    const lp = runsOf('ns_rate', rateCase, 'llmproxy');
    const a50 = rs.map((r, i) => diff(v(r, 'latency_ms.p50'), v(dr[i], 'latency_ms.p50')));
    const a99 = rs.map((r, i) => diff(v(r, 'latency_ms.p99'), v(dr[i], 'latency_ms.p99')));
    const l99 = lp.map((r, i) => diff(v(r, 'latency_ms.p99'), v(dr[i], 'latency_ms.p99')));
    const rat = a99.map((x, i) => ratio(x, l99[i]));
    const rates = [...new Set(rs.filter(ok).map((r) => r.rate_asked))];
    P(`| ${LABEL[p]}${failedNote(p)} | ${rates.join(', ') || '-'}${rates.some((x) => x !== params.ns_rate) ? ' (saturates below 2 x the common rate)' : ''} | ${spread(rs.map((r) => v(r, 'rps')), 0, true)} | ${f(median(rs.map((r) => v(r, 'latency_ms.p50'))), 3)} / ${f(median(rs.map((r) => v(r, 'latency_ms.p99'))), 3)} | ${p === 'direct' ? '-' : `**${spread(a50, 3)} / ${spread(a99, 3)}**`} | ${p === 'direct' || p === 'llmproxy' ? '-' : spread(rat, 2)} | ${f(median(rs.map((r) => d(r, 'proxy_cpu_pct'))), 0)} | ${spread(rs.map((r) => d(r, 'cpu_us_per_req')), 1)} | ${rs.reduce((s, r) => s + (ok(r) ? r.errors : 0), 0)} / ${rs.reduce((s, r) => s + (d(r, 'non200') || 0), 0)} |`);
  }
  P();
}

// (2)
const stCases = casesOf('stream').sort((a, b) => Number(a.slice(1)) - Number(b.slice(1)));
if (stCases.length) {
  P(`## (2) Streams: ${params.st_tokens} tokens at ${params.st_delay_ms} ms per token`);
  P();
  if (params.st_rounds === undefined) P(`Closed loop, ${params.st_duration_s} s measured after ${params.warmup_s} s of warmup (an earlier version of the harness: a window, not a count);`);
  else if (params.st_arrival === 'spread') {
    P(`Open loop: streams start at even intervals (the level / the stream's length per second, over 1.25 x the level of connections),`);
    P(`so that about the level are open at any time, not in step; ${params.st_rounds} x the level streams measured after one stream length of warmup`);
    P('(while the count of open streams rises); latency from the scheduled start. When CPU 1 (the mock and the load generator) is');
  } else {
    P(`Closed loop, ${params.st_rounds} x the concurrency streams measured after each connection's first stream (the warmup: a burst on cold`);
    P('connections); every measured stream runs on an open client connection; all streams being equally long, they stay in step,');
    P("so each round starts as a burst of the level's requests. When CPU 1 (the mock and the load generator) is");
  }
  P('~100 % busy, the load side is the bottleneck: the streams stretch, and TTFT and gaps include its queueing for every peer;');
  P(`the first token ${params.st_delay_ms} ms after the headers. TTFT: request sent -> first \`data:\` event. Gap: between consecutive events of`);
  P('a stream. "Added" = peer minus direct in the same run. Coalesced reads: socket reads that completed more');
  P('than one event, per stream; in parentheses those with more than one event besides `[DONE]` (the mock writes its');
  P('finish chunk and `[DONE]` back to back, and a proxy that reads both at once sends them together without holding');
  P('anything back). More than direct in parentheses means a proxy held events back and sent them together.');
  P();
  for (const cas of stCases) {
    P(`### ${cas.slice(1)} concurrent streams`);
    P();
    P('| peer | streams measured (with [DONE]) | TTFT p50 / p99 ms | **added TTFT p50 / p99 ms** | gap p50 / p99 ms | added gap p50 / p99 ms | coalesced reads / stream (without [DONE]) | proxy CPU % | proxy CPU µs/stream | CPU 1 busy | errors / non-200 |');
    P('|---|---|---|---|---|---|---|---|---|---|---|');
    for (const p of peerRows('stream', cas)) {
      const rs = runsOf('stream', cas, p);
      const dr = runsOf('stream', cas, 'direct');
      const at50 = rs.map((r, i) => diff(v(r, 'ttft_ms.p50'), v(dr[i], 'ttft_ms.p50')));
      const at99 = rs.map((r, i) => diff(v(r, 'ttft_ms.p99'), v(dr[i], 'ttft_ms.p99')));
      const ag50 = rs.map((r, i) => diff(v(r, 'gap_ms.p50'), v(dr[i], 'gap_ms.p50')));
      const ag99 = rs.map((r, i) => diff(v(r, 'gap_ms.p99'), v(dr[i], 'gap_ms.p99')));
      const req = rs.reduce((s, r) => s + (ok(r) ? r.requests : 0), 0);
      const done = rs.reduce((s, r) => s + (ok(r) ? r.streams_done : 0), 0);
      const dash = p === 'direct';
      P(`| ${LABEL[p]}${failedNote(p)} | ${req} (${done}) | ${f(median(rs.map((r) => v(r, 'ttft_ms.p50'))), 2)} / ${f(median(rs.map((r) => v(r, 'ttft_ms.p99'))), 2)} | ${dash ? '-' : `**${spread(at50, 2)} / ${spread(at99, 2)}**`} | ${f(median(rs.map((r) => v(r, 'gap_ms.p50'))), 2)} / ${f(median(rs.map((r) => v(r, 'gap_ms.p99'))), 2)} | ${dash ? '-' : `${spread(ag50, 2)} / ${spread(ag99, 2)}`} | ${f(median(rs.map((r) => d(r, 'coalesced_per_stream'))), 2)} (${f(median(rs.map((r) => d(r, 'coalesced_data_per_stream'))), 3)}) | ${f(median(rs.map((r) => d(r, 'proxy_cpu_pct'))), 0)} | ${spread(rs.map((r) => d(r, 'cpu_us_per_req')), 0)} | ${f(median(rs.map((r) => d(r, 'cpu1_all_pct'))), 0)} % | ${rs.reduce((s, r) => s + (ok(r) ? r.errors : 0), 0)} / ${rs.reduce((s, r) => s + (d(r, 'non200') || 0), 0)}${rs.some((r) => r && r.failed) ? ' (load run failed)' : ''} |`);
    }
    P();
  }
}

// (3) memory
const memPeers = [...new Set(mem.map((m) => m.peer))].sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
const levels = params.mem_levels.split(/\s+/).filter(Boolean).map(Number);
const slope = {};
{
  const cols = ['peer', 'run', 'level', 'held', 'establish_s', 'rss_before_kib', 'rss_kib', 'errors', 'streams_done', 'ttft_p99_ms', 'failed'];
  const rows = [cols.join(',')];
  for (const m of mem) rows.push([m.peer, m.run, m.level, m.held, m.establish_s, m.rss_before_kib, m.rss_kib, m.errors ?? '',
    m.streams_done ?? '', m.ttft_ms?.p99 ?? '', m.failed ? JSON.stringify(m.failed) : ''].join(','));
  writeFileSync(join(raw, 'memory.csv'), rows.join('\n') + '\n');
}
if (memPeers.length) {
  P(`## (3) Memory per concurrent stream (ramp ${levels.join(' -> ')} streams)`);
  P();
  P(`A fresh process of each proxy per run (${params.mem_runs} run${params.mem_runs > 1 ? 's' : ''}), the levels in increasing order; at each level the load`);
  P(`generator opens that many slow streams at once (${params.mem_tokens} tokens, one every ${params.mem_delay_ms} ms), and once they are`);
  P('established and have had two events each, the proxy\'s VmRSS (summed over its processes: nginx master +');
  P('worker) is read from /proc. Established client connections on the proxy\'s port (`ss`) and the RSS are');
  P('polled every 0.2 s for at most 20 s, and the sample with the most connections held is kept: "held" is that');
  P('count (a proxy that cannot take all of them at once is measured at what it held; its TTFT p99 shows how');
  P('long the clients waited). Memory per stream = (RSS at the last level - RSS at the first) / (held at the');
  P('last - held at the first), per run. A proxy holds two descriptors per stream (client and upstream); the');
  P('hard limit of 20,000 per process bounds the ramp at ~9,000.');
  P();
  P(`| peer | idle RSS MiB | ${levels.map((l) => `RSS MiB at ${l} (held)`).join(' | ')} | **KiB per stream** | peer / LLMProxy | TTFT p99 ms at ${levels[levels.length - 1]} | errors / streams not ended with [DONE] |`);
  P(`|---|---|${levels.map(() => '---|').join('')}---|---|---|---|`);
  const perRunSlope = (p, run) => {
    const pts = mem.filter((m) => m.peer === p && m.run === run && m.held > 0).sort((a, b) => a.level - b.level);
    if (pts.length < 2) return null;
    const a = pts[0], b = pts[pts.length - 1];
    return b.held > a.held ? (b.rss_kib - a.rss_kib) / (b.held - a.held) : null;
  };
  for (const p of memPeers) {
    slope[p] = [];
    for (let i = 1; i <= params.mem_runs; i++) slope[p].push(perRunSlope(p, i));
  }
  for (const p of memPeers) {
    const cells = levels.map((l) => {
      const ms = mem.filter((m) => m.peer === p && m.level === l);
      const held = median(ms.map((m) => m.held));
      return ms.length ? `${f(median(ms.map((m) => m.rss_kib / 1024)), 1)} (${fi(held)}${held < l ? ': **not all held**' : ''})` : '-';
    });
    const idle = memIdle.filter((m) => m.peer === p).map((m) => m.idle_rss_kib / 1024);
    const rat = slope[p].map((s, i) => ratio(s, (slope.llmproxy || [])[i]));
    const errs = mem.filter((m) => m.peer === p).reduce((s, m) => s + (m.errors || 0), 0);
    const notDone = mem.filter((m) => m.peer === p).reduce((s, m) => s + (m.requests !== undefined ? m.requests - m.streams_done : 0) + (m.failed ? m.level : 0), 0);
    const top = mem.filter((m) => m.peer === p && m.level === levels[levels.length - 1]).map((m) => m.ttft_ms?.p99 ?? null);
    P(`| ${LABEL[p]}${status(p).memory_failure ? ` **FAILED: ${String(status(p).memory_failure).replace(/\|/g, '/').slice(0, 200)}**` : ''} | ${f(median(idle), 1)} | ${cells.join(' | ')} | **${spread(slope[p], 1)}** | ${p === 'llmproxy' ? '1' : spread(rat, 2)} | ${f(median(top), 0)} | ${errs} / ${notDone} |`);
  }
  P();
}

// (4) prompt size
const prCases = casesOf('prompt').sort((a, b) => Number(a.slice(1)) - Number(b.slice(1)));
const kb = (n) => (n >= 1048576 ? `${n / 1048576} MiB` : `${n / 1024} KiB`);
if (prCases.length) {
  P('## (4) Prompt size: added latency and CPU per request');
  P();
  P(`One connection, closed loop, ${params.prompt_duration_s} s after 0.5 s of warmup; the body is a chat request whose one user message`);
  P('has the given size. Latency: request sent -> whole response received (the response is small).');
  P();
  P(`| prompt | ${peerList.filter((p) => !METERED.includes(p) && runs.some((r) => r.scenario === 'prompt' && r.peer === p)).map((p) => `${LABEL[p]} latency p50 / p99 ms${p === 'direct' ? '' : ' (**added p50**)'}`).join(' | ')} | ${peerList.filter((p) => p !== 'direct' && !METERED.includes(p) && runs.some((r) => r.scenario === 'prompt' && r.peer === p)).map((p) => `${LABEL[p]} CPU µs/req`).join(' | ')} |`);
  const ps = peerList.filter((p) => !METERED.includes(p) && runs.some((r) => r.scenario === 'prompt' && r.peer === p));
  P(`|---|${ps.map(() => '---|').join('')}${ps.filter((p) => p !== 'direct').map(() => '---|').join('')}`);
  for (const cas of prCases) {
    const dr = runsOf('prompt', cas, 'direct');
    const cells = ps.map((p) => {
      const rs = runsOf('prompt', cas, p);
      const a50 = rs.map((r, i) => diff(v(r, 'latency_ms.p50'), v(dr[i], 'latency_ms.p50')));
      return `${f(median(rs.map((r) => v(r, 'latency_ms.p50'))), 3)} / ${f(median(rs.map((r) => v(r, 'latency_ms.p99'))), 3)}${p === 'direct' ? '' : ` (**${spread(a50, 3)}**)`}`;
    });
    const cpu = ps.filter((p) => p !== 'direct').map((p) => spread(runsOf('prompt', cas, p).map((r) => d(r, 'cpu_us_per_req')), 0));
    P(`| ${kb(Number(cas.slice(1)))} | ${cells.join(' | ')} | ${cpu.join(' | ')} |`);
  }
  P();
}

// (5) metering
const meterRatio = {};  // peer -> per-run on / off ratios of non-stream req/s
const meteredPeers = METERED.filter((p) => peerList.includes(p) || runs.some((r) => r.peer === p));
if (meteredPeers.length) {
  P('## (5) Metering on vs off (LLMProxy)');
  P();
  P('`llmproxy-metered` (usage records to the SQLite log, defaults) and `llmproxy-hooked` (the same plus the webhook,');
  P('batches of 100 to the mock\'s receiver) against `llmproxy` (`usage: {enabled: false}`), in the same runs as above.');
  P('The usage writer and the webhook sink are threads of the gateway: pinned with it to CPU 0, their CPU time is');
  P('taken from the requests\' (on a machine with a spare core they would run there). Drain rates: `bench/usage.sh`.');
  P();
  P('| measure | metering | off | on | **on / off** (per run) | added CPU µs per request / stream |');
  P('|---|---|---|---|---|---|');
  const what = { 'llmproxy-metered': 'log', 'llmproxy-hooked': 'log + webhook' };
  if (nsCase) for (const mp of meteredPeers) {
    const off = runsOf('ns_closed', nsCase, 'llmproxy'), on = runsOf('ns_closed', nsCase, mp);
    const rat = on.map((r, i) => ratio(v(r, 'rps'), v(off[i], 'rps')));
    meterRatio[mp] = rat;
    P(`| non-stream req/s (closed loop) | ${what[mp]} | ${spread(off.map((r) => v(r, 'rps')), 0, true)} | ${spread(on.map((r) => v(r, 'rps')), 0, true)} | **${spread(rat, 3)}** | ${spread(on.map((r, i) => diff(d(r, 'cpu_us_per_req'), d(off[i], 'cpu_us_per_req'))), 1)} |`);
  }
  if (rateCase) for (const mp of meteredPeers) {
    const off = runsOf('ns_rate', rateCase, 'llmproxy'), on = runsOf('ns_rate', rateCase, mp);
    P(`| non-stream latency p99 ms at ${params.ns_rate} req/s | ${what[mp]} | ${f(median(off.map((r) => v(r, 'latency_ms.p99'))), 3)} | ${f(median(on.map((r) => v(r, 'latency_ms.p99'))), 3)} | ${spread(on.map((r, i) => ratio(v(r, 'latency_ms.p99'), v(off[i], 'latency_ms.p99'))), 2)} | ${spread(on.map((r, i) => diff(d(r, 'cpu_us_per_req'), d(off[i], 'cpu_us_per_req'))), 1)} |`);
  }
  if (stCases.length) for (const mp of meteredPeers) {
    const cas = stCases[0];
    const off = runsOf('stream', cas, 'llmproxy'), on = runsOf('stream', cas, mp);
    P(`| ${cas.slice(1)} streams: TTFT p99 ms | ${what[mp]} | ${f(median(off.map((r) => v(r, 'ttft_ms.p99'))), 2)} | ${f(median(on.map((r) => v(r, 'ttft_ms.p99'))), 2)} | ${spread(on.map((r, i) => ratio(v(r, 'ttft_ms.p99'), v(off[i], 'ttft_ms.p99'))), 3)} | ${spread(on.map((r, i) => diff(d(r, 'cpu_us_per_req'), d(off[i], 'cpu_us_per_req'))), 0)} |`);
  }
  P();
  if (meteredPeers.includes('llmproxy-hooked')) {
    const hd = existsSync(join(raw, 'hook-delivery.json')) ? JSON.parse(readFileSync(join(raw, 'hook-delivery.json'), 'utf8')) : null;
    if (!hd) P('Delivery check: **not run** (`llmproxy-hooked` did not take part to the end).');
    else if (!hd.settled) P('Delivery check: **failed**: the hooked gateway did not drain its usage backlog within 60 s after the load runs.');
    else P(`Delivery check after the load runs: the hooked gateway logged ${hd.logged} records and the receiver got ${hd.received}: ${hd.logged === hd.received ? '**every record delivered**' : '**MISMATCH**'}.`);
    P();
  }
}

// --- targets ---------------------------------------------------------------------------------------
const T = [];
const mark = (met, text) => T.push(`| ${met === null ? 'not measured' : met ? '**met**' : '**missed**'} | ${text} |`);
const perRun = (scen, cas, peer, path) => runsOf(scen, cas, peer).map((r) => v(r, path));
if (nsCase && peerList.includes('nginx')) {
  const lp = perRun('ns_closed', nsCase, 'llmproxy', 'rps'), ng = perRun('ns_closed', nsCase, 'nginx', 'rps');
  const rat = lp.map((x, i) => ratio(x, ng[i]));
  const m = median(rat);
  let p99 = '';
  let met99 = null;
  if (rateCase) {
    const dr = perRun('ns_rate', rateCase, 'direct', 'latency_ms.p99');
    const a = perRun('ns_rate', rateCase, 'llmproxy', 'latency_ms.p99').map((x, i) => diff(x, dr[i]));
    const b = perRun('ns_rate', rateCase, 'nginx', 'latency_ms.p99').map((x, i) => diff(x, dr[i]));
    const ma = median(a), mb = median(b);
    met99 = ma === null || mb === null ? null : ma <= mb;
    p99 = `; added p99 at ${params.ns_rate} req/s: LLMProxy ${f(ma, 3)} ms vs nginx ${f(mb, 3)} ms`;
  }
  mark(m === null ? null : m >= 1.2 && met99 !== false,
    `Non-stream throughput >= 1.2 x nginx's, p99 added latency no higher than nginx's: LLMProxy / nginx = ${spread(rat, 3)} (per run)${p99}${failedNote('nginx')}`);
}
if (stCases.length) {
  const cas = stCases[stCases.length - 1];
  const dr = perRun('stream', cas, 'direct', 'ttft_ms.p99');
  const a = perRun('stream', cas, 'llmproxy', 'ttft_ms.p99').map((x, i) => diff(x, dr[i]));
  // Reads with several events besides [DONE] when the load generator counted them, else all.
  const hasData = runsOf('stream', cas, 'direct').some((r) => d(r, 'coalesced_data_per_stream') !== null);
  const metric = hasData ? 'coalesced_data_per_stream' : 'coalesced_per_stream';
  const cl = runsOf('stream', cas, 'llmproxy').map((r) => d(r, metric));
  const cd = runsOf('stream', cas, 'direct').map((r) => d(r, metric));
  const dg = perRun('stream', cas, 'direct', 'gap_ms.p99');
  const ag = perRun('stream', cas, 'llmproxy', 'gap_ms.p99').map((x, i) => diff(x, dg[i]));
  const m = median(a), mc = median(cl), md0 = median(cd);
  mark(m === null ? null : m < 1 && mc !== null && md0 !== null && mc <= md0 + 0.01,
    `Added TTFT p99 < 1 ms at ${cas.slice(1)} concurrent streams, no event delayed behind another: added TTFT p99 ${spread(a, 2)} ms; coalesced reads per stream${hasData ? ' (without [DONE])' : ''} ${f(mc, 3)} (direct ${f(md0, 3)}); added gap p99 ${spread(ag, 2)} ms`);
}
if (slope.llmproxy) {
  const ml = median(slope.llmproxy), mn = slope.nginx ? median(slope.nginx) : null;
  mark(ml === null || mn === null ? null : ml <= mn,
    `Memory per concurrent stream no more than nginx's (aim under 16 KiB): LLMProxy ${f(ml, 1)} KiB, nginx ${f(mn, 1)} KiB per stream (${ml !== null && ml < 16 ? 'under' : 'not under'} 16 KiB). Flat over a 10-minute soak: not measured by this harness (see \`bench/memory.sh\` for growth with stream length)`);
}
if (nsCase && peerList.includes('portkey')) {
  const lp = perRun('ns_closed', nsCase, 'llmproxy', 'rps'), pk = perRun('ns_closed', nsCase, 'portkey', 'rps');
  const rat = lp.map((x, i) => ratio(x, pk[i]));
  const m = median(rat);
  mark(m === null ? null : m >= 20, `At least 20 x the Portkey gateway's throughput: LLMProxy / Portkey = ${spread(rat, 1)} (per run, non-stream closed loop)${failedNote('portkey')}`);
}
for (const [mp, rat] of Object.entries(meterRatio)) {
  const m = median(rat);
  mark(m === null ? null : m >= 0.95, `Metering on costs under 5 % of throughput (${mp === 'llmproxy-hooked' ? 'log + webhook' : 'log only'}): on / off = ${spread(rat, 3)} (per run, non-stream closed loop)`);
}
P('## Issue 5 targets');
P();
if (quick) P('**Smoke run: these marks only show that the harness computes them; they are not results.**\n');
P('| status | target and numbers (medians over runs, with min–max) |');
P('|---|---|');
for (const t of T) P(t);
P();

// --- anomalies -----------------------------------------------------------------------------------
const anomalies = [];
for (const r of runs) {
  const id = `${r.scenario} ${r.case} ${r.peer} run ${r.run}`;
  if (r.failed) { anomalies.push(`- ${id}: load run failed: ${r.failed}`); continue; }
  if (!r.requests) anomalies.push(`- ${id}: nothing measured (0 requests in the measured window: the window is shorter than one stream, or the peer answered nothing)`);
  if (r.errors) anomalies.push(`- ${id}: ${r.errors} errors ${JSON.stringify(r.error_kinds)}`);
  if (D.get(r).non200) anomalies.push(`- ${id}: status ${JSON.stringify(r.status_counts)}`);
  if (r.mode === 'stream' && r.streams_done !== r.requests) anomalies.push(`- ${id}: ${r.streams_done} of ${r.requests} streams ended with [DONE]`);
  if (r.mode === 'stream' && D.get(r).cpu1_all_pct >= 95) anomalies.push(`- ${id}: CPU 1 (mock + load generator) ${f(D.get(r).cpu1_all_pct, 0)} % busy: the load side is the bottleneck; TTFT and gaps include its queueing`);
  const o = Math.max(D.get(r).others0_pct || 0, D.get(r).others1_pct || 0);
  if (o > 10) anomalies.push(`- ${id}: other processes kept a CPU ${f(o, 0)} % busy: not comparable`);
  if (r.scenario === 'ns_rate' && r.rps && r.rate_asked && r.rps < 0.95 * r.rate_asked) anomalies.push(`- ${id}: ${f(r.rps, 0)} req/s achieved of ${r.rate_asked} asked (saturated)`);
}
for (const m of mem) {
  const id = `memory ${m.peer} run ${m.run} at ${m.level}`;
  if (m.failed) anomalies.push(`- ${id}: ${m.failed}`);
  if (m.held < m.level) anomalies.push(`- ${id}: at most ${m.held} streams were held at once (TTFT p99 ${f(m.ttft_ms?.p99, 0)} ms): the proxy did not take them all within 20 s`);
  if (m.errors) anomalies.push(`- ${id}: ${m.errors} errors ${JSON.stringify(m.error_kinds)}`);
  if (m.requests !== undefined && m.streams_done !== m.requests) anomalies.push(`- ${id}: ${m.streams_done} of ${m.requests} streams ended with [DONE]`);
}
for (const p of peerList) if (status(p).status !== 'ok') anomalies.push(`- ${LABEL[p]} failed: ${status(p).reason}`);
P('## Anomalies');
P();
P(anomalies.length ? anomalies.slice(0, 60).join('\n') + (anomalies.length > 60 ? `\n- ... ${anomalies.length - 60} more (runs.csv)` : '') : `None: no errors, every answer 200, every stream ended with \`data: [DONE]\`${mem.length ? ', every memory level fully established' : ''}.`);
P();
if (logLines) {
  P('Error and warning lines in the peers\' logs (first 5 each):');
  P();
  P('```');
  P(logLines);
  P('```');
  P();
}
writeFileSync(join(out, 'compare.md'), md.join('\n'));

// --- gnuplot data ----------------------------------------------------------------------------------
{
  const rows = [];
  let i = 0;
  if (nsCase) for (const p of peerRows('ns_closed', nsCase)) {
    const xs = perRun('ns_closed', nsCase, p, 'rps');
    if (median(xs) === null) continue;
    rows.push(`${i++} "${LABEL[p].replace('LLMProxy, metering on', 'LLMProxy+meter').replace('LLMProxy, metering + webhook', 'LLMProxy+hook').replace(' (mock)', '')}" ${median(xs)} ${min(xs)} ${max(xs)}`);
  }
  writeFileSync(join(raw, 'throughput.dat'), '# idx peer median_rps min max\n' + rows.join('\n') + '\n');
}
{
  const rows = [];
  let i = 0;
  for (const cas of stCases) for (const p of peerRows('stream', cas)) {
    if (p === 'direct' || METERED.includes(p)) continue;
    const dr = perRun('stream', cas, 'direct', 'ttft_ms.p99');
    const a = perRun('stream', cas, p, 'ttft_ms.p99').map((x, k) => diff(x, dr[k]));
    if (median(a) === null) continue;
    rows.push(`${i++} "${LABEL[p]} ${cas.slice(1)}" ${median(a)} ${min(a)} ${max(a)}`);
  }
  writeFileSync(join(raw, 'ttft.dat'), '# idx peer_level median_added_ttft_p99_ms min max\n' + rows.join('\n') + '\n');
}
{
  const blocks = [];
  for (const p of memPeers) {
    const pts = levels.map((l) => {
      const ms = mem.filter((m) => m.peer === p && m.level === l && m.held > 0);
      return ms.length ? `${median(ms.map((m) => m.held))} ${median(ms.map((m) => m.rss_kib / 1024))}` : null;
    }).filter(Boolean);
    if (pts.length) blocks.push(`"${LABEL[p]}" "RSS MiB"\n${pts.join('\n')}`);
  }
  writeFileSync(join(raw, 'memory.dat'), blocks.join('\n\n\n') + '\n');
}
console.error(`compare-report: wrote ${join(out, 'compare.md')}`);
