// tetri-engine live dashboard. Reads the Server-Sent Events of dashboard/stream (tetri_engine/server/
// dashboard_feed.py says what they hold): a "snapshot" (the whole window) on connect, then a "tick"
// (the groups that ended, the groups running now, the queue, the counters) every 0.5 s.
// Memory stays bounded: groups older than the longest window (300 s) are dropped.
"use strict";

const HISTORY_S = 300;
const FRAME_MS = 125; // timeline redraws between ticks, so running blocks grow smoothly
const QUEUE_ROWS = 12; // the soonest deadlines; the rest are counted
const SVG_NS = "http://www.w3.org/2000/svg";
// Colour by resolution: the paper's four sizes always the same colours (those of the demo's Gantt
// plot), any other size one of OTHER_COLOURS picked by its numbers (the same on every page). Red is
// kept for "late".
const SIZE_COLOURS = { "256x256": "#4c72b0", "512x512": "#55a868", "1024x1024": "#dd8452", "2048x2048": "#8172b3" };
const OTHER_COLOURS = ["#64b5cd", "#937860", "#da8bc3", "#b8a33f", "#5f9e8f", "#8c8c8c", "#e0a458"]; // 7: prime

const state = {
  header: { devices: [] },
  groups: new Map(), // key -> group that ended
  running: [],
  queue: [],
  counters: null,
  lateIds: new Set(),
  nowS: 0,
  nowAtMs: 0,
  windowS: 60,
  source: null,
};

const $ = (id) => document.getElementById(id);

// ---- the stream -------------------------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource(`dashboard/stream?window_s=${state.windowS}`);
  state.source = source;
  source.addEventListener("snapshot", (e) => apply(JSON.parse(e.data), true));
  source.addEventListener("tick", (e) => apply(JSON.parse(e.data), false));
  source.onopen = () => setTag("connection", "live", "ok");
  source.onerror = () => setTag("connection", source.readyState === EventSource.CLOSED ? "closed" : "reconnecting", "bad");
}

function groupKey(g) { return `${g.start_s}|${g.devices.join(",")}`; }

function apply(msg, reset) {
  if (reset) { state.groups.clear(); state.lateIds.clear(); }
  state.header = { phase: msg.phase, model: msg.model, policy: msg.policy, devices: msg.devices };
  for (const g of msg.groups) state.groups.set(groupKey(g), g);
  state.running = msg.running;
  state.queue = msg.queue;
  state.counters = msg.counters;
  state.nowS = msg.now_s;
  state.nowAtMs = performance.now();
  for (const g of [...msg.groups, ...msg.running]) for (const rid of g.late) state.lateIds.add(rid);
  for (const r of msg.queue) if (r.late) state.lateIds.add(r.request_id);
  prune();
  renderHeader();
  renderCards();
  renderQueue();
  renderBusy();
  renderTimeline();
}

function prune() {
  const horizon = state.nowS - HISTORY_S;
  for (const [key, g] of state.groups) if (g.end_s < horizon) state.groups.delete(key);
  const seen = new Set();
  for (const g of [...state.groups.values(), ...state.running]) for (const rid of g.request_ids) seen.add(rid);
  for (const r of state.queue) seen.add(r.request_id);
  for (const rid of state.lateIds) if (!seen.has(rid)) state.lateIds.delete(rid);
}

// The server's clock moves on between ticks; never run more than a second ahead of the last one.
function nowS() { return state.nowS + Math.min(1, (performance.now() - state.nowAtMs) / 1000); }

// ---- small helpers -----------------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function setTag(id, text, kind) {
  const node = $(id);
  node.textContent = text;
  node.className = `tag ${kind || ""}`;
}

function shortId(id) {
  const m = /^img-([0-9a-f]{6})[0-9a-f]*(-\d+)?$/.exec(id);
  if (m) return m[1] + (m[2] || "");
  return id.length > 12 ? `${id.slice(0, 11)}…` : id;
}

function sizeColour(w, h) {
  if (!w || !h) return "#cfd3da";
  return SIZE_COLOURS[`${w}x${h}`] || OTHER_COLOURS[((w / 16) * 5 + (h / 16) * 3) % OTHER_COLOURS.length];
}

function sizeText(w, h) { return w && h ? `${w}×${h}` : "?"; }
function fmtS(s) {
  const a = Math.abs(s);
  return `${s < 0 ? "−" : ""}${a.toFixed(a < 1 ? 2 : a < 10 ? 1 : 0)} s`;
}
function pct(f) { return `${Math.round(100 * f)}%`; }
function windowText() { return state.windowS >= 120 ? `${state.windowS / 60} min` : `${state.windowS} s`; }
function deviceIndex(name) { return state.header.devices.indexOf(name); }

// ---- panels ------------------------------------------------------------------------------------

function renderHeader() {
  const h = state.header;
  $("model").textContent = `model ${h.model ?? "–"}`;
  $("policy").textContent = `policy ${h.policy ?? "–"}`;
  const kind = { ready: "ok", starting: "warn", draining: "warn", stopped: "bad" }[h.phase] || "";
  setTag("phase", `${h.phase} · ${h.devices.length} devices`, kind);
}

function renderCards() {
  const c = state.counters;
  if (!c) return;
  const win = windowText();
  $("sar-label").textContent = `SAR · last ${win}`;
  $("missed-label").textContent = `deadline misses · last ${win}`;
  const sar = $("sar-window");
  sar.textContent = c.sar_window === null ? "–" : c.sar_window.toFixed(2);
  sar.className = `value ${c.sar_window === null ? "" : c.sar_window >= 0.9 ? "good" : c.sar_window >= 0.6 ? "warn" : "bad"}`;
  const allTime = c.sar_total === null ? "–" : c.sar_total.toFixed(2);
  $("sar-sub").textContent = `${c.met_window} of ${c.met_window + c.missed_window} met · all ${allTime}`;
  const missed = $("missed-window");
  missed.textContent = c.missed_window;
  missed.className = `value ${c.missed_window ? "bad" : "good"}`;
  $("missed-sub").textContent = `all: ${c.deadline_total - c.deadline_met} of ${c.deadline_total}`;
  $("queue-depth").textContent = `${c.queue_depth} · ${c.running}`;
  $("queue-sub").textContent = "waiting · running";
  const s = c.states;
  $("completed").textContent = s.completed ?? 0;
  $("states-sub").textContent = `${s.failed ?? 0} failed · ${s.cancelled ?? 0} cancelled · ${s.rejected ?? 0} rejected`;
  $("regroups").textContent = c.regroups;
  $("rounds-sub").textContent = `in ${c.rounds} rounds`;
  const cache = c.comm_cache;
  $("cache-hits").textContent = `${cache.hits} hits`;
  $("cache-sub").textContent = `${cache.misses} misses · ${cache.size} communicators`;
}

function renderQueue() {
  const body = $("queue").querySelector("tbody");
  body.replaceChildren();
  for (const r of state.queue.slice(0, QUEUE_ROWS)) {
    const tr = el("tr", { "data-request": r.request_id, class: r.late ? "late" : "" });
    const id = el("td", { class: "id", title: r.request_id }, shortId(r.request_id));
    const size = el("td");
    size.append(el("span", { class: "dot" }), sizeText(r.width, r.height));
    size.firstChild.style.background = sizeColour(r.width, r.height);
    const steps = el("td", {}, `${r.steps_done}/${r.num_steps}`);
    const bar = el("span", { class: "progress" });
    const fill = el("span");
    fill.style.width = `${(100 * r.steps_done) / r.num_steps}%`;
    bar.append(fill);
    steps.append(bar);
    const devices = el("td", { class: r.devices.length ? "" : "muted" },
      r.devices.length ? r.devices.join(" ") : r.state === "waiting" ? "waiting" : "between rounds");
    const deadline = el("td", { class: `num ${r.deadline_in_s < 0 ? "bad" : ""}` }, fmtS(r.deadline_in_s));
    const slack = el("td", { class: `num ${r.slack_s < 0 ? "bad" : r.slack_s < 1 ? "warn" : "good"}` }, fmtS(r.slack_s));
    tr.append(id, size, steps, devices, deadline, slack);
    body.append(tr);
  }
  const more = state.queue.length - QUEUE_ROWS;
  if (more > 0) {
    const tr = el("tr", { class: "more" });
    tr.append(el("td", { colspan: 6, class: "muted" }, `+ ${more} more with later deadlines`));
    body.append(tr);
  }
  $("queue-empty").hidden = state.queue.length > 0;
}

function renderBusy() {
  const c = state.counters;
  if (!c) return;
  $("busy-hint").textContent = `share of the last ${windowText()} · since start`;
  const box = $("busy");
  box.replaceChildren();
  for (const d of state.header.devices) {
    const f = c.busy_window[d] ?? 0;
    const row = el("div", { class: "busy-row", "data-device": d });
    const bar = el("div", { class: "bar" });
    const fill = el("span");
    fill.style.width = pct(f);
    bar.append(fill);
    row.append(el("span", { class: "name" }, d), bar, el("span", { class: "pct" }, pct(f)),
      el("span", { class: "total" }, `since start ${pct(c.busy_total[d] ?? 0)}`));
    box.append(row);
  }
}

// ---- the timeline: one lane per device, one block per group (a group on k adjacent devices is
// one block k lanes tall: the "Tetris" view) --------------------------------------------------

function renderTimeline() {
  const svg = $("timeline");
  const devices = state.header.devices;
  const width = svg.clientWidth || 1000;
  const labelW = 62, axisH = 20, top = 4;
  const laneH = Math.max(26, Math.min(46, 260 / Math.max(1, devices.length)));
  const height = top + laneH * devices.length + axisH;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  const now = nowS();
  const t0 = now - state.windowS;
  const plotW = width - labelW - 8;
  const x = (t) => labelW + ((t - t0) / state.windowS) * plotW;

  const nodes = [defs()];
  devices.forEach((d, i) => {
    nodes.push(el("svg:rect", { class: "lane", x: labelW, y: top + i * laneH + 1, width: plotW, height: laneH - 2 }));
    nodes.push(el("svg:text", { class: "lane-label", x: 4, y: top + i * laneH + laneH / 2 + 4 }, d));
  });
  const step = { 30: 5, 60: 10, 120: 20, 300: 60 }[state.windowS] || 10;
  for (let ago = 0; ago <= state.windowS; ago += step) {
    const gx = x(now - ago);
    nodes.push(el("svg:line", { class: ago ? "grid" : "now", x1: gx, x2: gx, y1: top, y2: top + laneH * devices.length }));
    nodes.push(el("svg:text", { class: "tick", x: gx, y: height - 5, "text-anchor": ago === state.windowS ? "start" : ago ? "middle" : "end" },
      ago ? `−${ago} s` : "now"));
  }
  const sizes = new Map();
  const blocks = [...state.groups.values(), ...state.running];
  for (const g of blocks) {
    const end = g.running && !g.ended ? Math.max(g.end_s, now) : g.end_s;
    if (end < t0) continue;
    sizes.set(sizeText(g.width, g.height), sizeColour(g.width, g.height));
    nodes.push(block(g, x(Math.max(g.start_s, t0)), x(Math.min(end, now)), laneH, top));
  }
  svg.replaceChildren(...nodes);
  renderLegend(sizes);
}

function defs() {
  const d = el("svg:defs");
  const p = el("svg:pattern", { id: "late-hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" });
  p.append(el("svg:rect", { width: 1.5, height: 6, fill: "#b71c1c", "fill-opacity": 0.45 }));
  d.append(p);
  return d;
}

function block(g, x0, x1, laneH, top) {
  const late = g.request_ids.some((rid) => state.lateIds.has(rid));
  const classes = ["block", g.running ? "running" : "", late ? "late" : "", g.error ? "failed" : ""].join(" ").trim();
  const node = el("svg:g", {
    class: classes, "data-requests": g.request_ids.join(" "), "data-degree": g.degree,
    "data-devices": g.devices.join(" "), "data-size": sizeText(g.width, g.height),
    "data-late": late ? "1" : "0", "data-running": g.running ? "1" : "0",
  });
  const duration = (g.running ? "running" : `${(g.end_s - g.start_s).toFixed(2)} s`);
  node.append(el("svg:title", {}, `${g.request_ids.join(", ")}\n${sizeText(g.width, g.height)} · degree ${g.degree} on ` +
    `${g.devices.join(", ")}\n${g.steps} steps · ${duration}${late ? " · late" : ""}${g.error ? `\n${g.error}` : ""}`));
  const w = Math.max(2, x1 - x0);
  const label = g.request_ids.length > 1 ? `${shortId(g.request_ids[0])}+${g.request_ids.length - 1}` : shortId(g.request_ids[0]);
  let first = true;
  for (const [a, b] of lanesOf(g.devices)) { // adjacent devices form one block
    const y = top + a * laneH + 3, h = (b - a + 1) * laneH - 6;
    node.append(el("svg:rect", { class: "body", x: x0, y, width: w, height: h, rx: 3, fill: sizeColour(g.width, g.height) }));
    if (late) node.append(el("svg:rect", { x: x0, y, width: w, height: h, rx: 3, fill: "url(#late-hatch)" }));
    if (first && w >= 30) {
      const chars = Math.floor((w - 8) / 6.6);
      const cy = y + h / 2;
      const twoLines = h >= 30;
      node.append(el("svg:text", { x: x0 + 4, y: twoLines ? cy - 2 : cy + 4 }, clip(`${label}`, chars)));
      if (twoLines) {
        const what = g.ended ? "done" : g.running ? "running" : `${g.steps} step${g.steps === 1 ? "" : "s"}`;
        const detail = `k=${g.degree} · ${what}`;
        node.append(el("svg:text", { class: "minor", x: x0 + 4, y: cy + 11 }, detail.length <= chars ? detail : `k=${g.degree}`));
      }
      else if (chars > label.length + 4) node.lastChild.textContent = `${label} k=${g.degree}`;
    }
    first = false;
  }
  return node;
}

function clip(text, chars) { return text.length <= chars ? text : `${text.slice(0, Math.max(1, chars - 1))}…`; }

function lanesOf(devices) {
  const idx = devices.map(deviceIndex).filter((i) => i >= 0).sort((a, b) => a - b);
  const runs = [];
  for (const i of idx) {
    if (runs.length && runs[runs.length - 1][1] === i - 1) runs[runs.length - 1][1] = i;
    else runs.push([i, i]);
  }
  return runs;
}

function renderLegend(sizes) {
  const box = $("legend");
  box.replaceChildren();
  const entries = [...sizes.entries()].sort((a, b) => area(a[0]) - area(b[0]));
  for (const [text, colour] of entries) {
    const sw = el("span", { class: "swatch" });
    sw.style.background = colour;
    const item = el("span", { class: "item" });
    item.append(sw, text === "?" ? "size not seen (ended between samples)" : text);
    box.append(item);
  }
  for (const [cls, text] of [["late", "late (cannot make its deadline)"], ["running", "round in progress"]]) {
    const item = el("span", { class: "item" });
    item.append(el("span", { class: `swatch ${cls}` }), text);
    box.append(item);
  }
}

function area(text) { const [w, h] = text.split("×").map(Number); return (w || 0) * (h || 0); }

// ---- start --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const select = $("window");
  const asked = new URLSearchParams(window.location.search).get("window"); // e.g. /dashboard?window=30
  if ([...select.options].some((o) => o.value === asked)) select.value = asked;
  state.windowS = Number(select.value);
  select.addEventListener("change", () => { state.windowS = Number(select.value); connect(); });
  connect();
  setInterval(() => { if (state.counters) renderTimeline(); }, FRAME_MS);
  window.addEventListener("resize", renderTimeline);
});
