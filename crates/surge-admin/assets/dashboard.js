"use strict";
// Surge live dashboard. Plain DOM + hand-drawn SVG; served under a strict CSP, so no inline
// code and no innerHTML: every piece of data goes through textContent or setAttribute.

const WINDOW_MS = 15 * 60 * 1000; // the charts' span, and how much history is kept
const TOKEN_KEY = "surge.token";
const DASH = "–";
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;

// Script errors are kept where a test (or a curious user) can read them.
window.__surgeErrors = [];
addEventListener("error", (e) => window.__surgeErrors.push(String(e.message)));
addEventListener("unhandledrejection", (e) => window.__surgeErrors.push(String(e.reason)));

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let last = null; // the newest sample
let historyLoaded = false;
let historyNow = null;
let intervalMs = 1000;
const hist = new Map(); // service -> {t, rps, err, p99, ready, desired} parallel arrays
let decisions = [];
const expanded = new Set(); // services whose instance table is open
let detail = null; // {service, instance} shown in #instance-detail

// A token in the address (#token=XYZ) is moved to sessionStorage and out of the URL, so it
// does not stay in the history or get copied along with the link.
{
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    try { token = decodeURIComponent(m[1]); } catch { token = m[1]; }
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

// ---- small helpers

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...kids); // strings become text nodes
  return e;
}
// Writes only on change: no needless mutations, and selections/tooltips survive.
function setText(e, t) { t = String(t); if (e.textContent !== t) e.textContent = t; }
function setAttr(e, k, v) {
  if (v == null) e.removeAttribute(k);
  else if (e.getAttribute(k) !== String(v)) e.setAttribute(k, v);
}
const on = (sel, type, fn) => $(sel).addEventListener(type, fn);
// Puts `nodes` in order under `parent` moving only what is out of place (moving a node
// would blur an input inside it), and removes the rest.
function place(parent, nodes) {
  let cur = parent.firstChild;
  for (const n of nodes) {
    if (n === cur) cur = cur.nextSibling;
    else parent.insertBefore(n, cur);
  }
  while (cur) { const next = cur.nextSibling; cur.remove(); cur = next; }
}

const fmtInt = (n) => (n == null ? DASH : String(Math.round(n)));
const fmt1 = (n) => (n == null ? DASH : Number(n).toFixed(1));
const fmtPct = (r) => (r == null ? DASH : (r * 100).toFixed(r > 0 && r < 0.1 ? 2 : 1) + "%");
function fmtDur(ms) {
  if (ms == null || !isFinite(ms)) return DASH;
  let s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + "s";
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  s %= 60;
  const p = (n) => String(n).padStart(2, "0");
  return d ? `${d}d${h}h` : h ? `${h}h${p(m)}m` : `${m}m${p(s)}s`;
}
const fmtAge = (s) => (s == null ? DASH : s < 60 ? s.toFixed(1) + " s" : fmtDur(s * 1000));
function fmtBytes(n) {
  if (n == null) return DASH;
  let i = 0;
  for (; n >= 1024 && i < 4; i++) n /= 1024;
  return (i ? n.toFixed(1) : n) + " " + ["B", "KiB", "MiB", "GiB", "TiB"][i];
}

// ---- messages and the token

let msgTimer = 0;
function say(text, isError) {
  const m = $("#message");
  clearTimeout(msgTimer);
  m.textContent = text;
  m.className = isError ? "err" : "ok";
  m.hidden = false;
  // Successes fade; errors stay until replaced or clicked away.
  if (!isError) msgTimer = setTimeout(() => { m.hidden = true; }, 10000);
}

function needToken() {
  $("#auth-needed").hidden = false;
  if (document.activeElement === document.body) $("#token-input").focus();
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const init = { method, headers, cache: "no-store" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json"; // the API refuses changes of other types
    init.body = body === undefined ? "" : JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (res.status === 401) needToken();
  if (!res.ok) throw new Error(data?.error || `${res.status} ${res.statusText}`);
  return data;
}

// ---- the live stream
// EventSource cannot send Authorization, so SSE is read from fetch() by hand.

let streamCtl = null;
let backoff = 1000;
let retryTimer = 0;

function setConn(state, text) {
  const c = $("#connection");
  c.dataset.state = state;
  setText(c, text);
}

async function connect() {
  clearTimeout(retryTimer);
  if (streamCtl) streamCtl.abort();
  const ctl = (streamCtl = new AbortController());
  let unauthorized = false;
  try {
    const headers = { Accept: "text/event-stream" };
    if (token) headers.Authorization = "Bearer " + token;
    const res = await fetch("/events", { headers, signal: ctl.signal, cache: "no-store" });
    if (res.status === 401) unauthorized = true;
    if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
    setConn("live", "live");
    await readEvents(res.body, ctl);
  } catch { /* reconnect below */ }
  if (ctl !== streamCtl) return; // replaced by a newer connection (token changed)
  if (unauthorized) return needToken(), setConn("auth", "token needed"); // no retry until a token is saved
  setConn("retry", "reconnecting…");
  retryTimer = setTimeout(connect, backoff);
  backoff = Math.min(backoff * 2, 10000);
}

async function readEvents(body, ctl) {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = "", type = "", data = [];
  // Samples come every second: a silent connection (lost network, stuck proxy) is dead.
  let watchdog = 0;
  const arm = () => { clearTimeout(watchdog); watchdog = setTimeout(() => ctl.abort(), 15000); };
  arm();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      arm();
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        let line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") { // a blank line ends the event
          if (data.length) onEvent(type || "message", data.join("\n"));
          type = ""; data = [];
          continue;
        }
        if (line[0] === ":") continue; // comment / keep-alive
        const c = line.indexOf(":");
        const field = c < 0 ? line : line.slice(0, c);
        let v = c < 0 ? "" : line.slice(c + 1);
        if (v[0] === " ") v = v.slice(1);
        if (field === "data") data.push(v);
        else if (field === "event") type = v;
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

function onEvent(type, data) {
  if (type !== "sample" && type !== "message") return;
  let s;
  try { s = JSON.parse(data); } catch { return; }
  backoff = 1000; // a good event proves the connection
  applySample(s);
}

// ---- data

const KEYS = ["t", "rps", "err", "p99", "ready", "desired"];
function series(name) {
  if (!hist.has(name)) hist.set(name, Object.fromEntries(KEYS.map((k) => [k, []])));
  return hist.get(name);
}

function addDecision(d) {
  // The backend's history may already hold the same change.
  if (decisions.some((x) => x.service === d.service && x.to === d.to && Math.abs(x.t_ms - d.t_ms) < 5000)) return;
  decisions.push(d);
}

function prune(now) {
  const cut = now - WINDOW_MS;
  for (const h of hist.values()) {
    let i = 0;
    while (i < h.t.length && h.t[i] < cut) i++;
    if (i) for (const k of KEYS) h[k].splice(0, i);
  }
  decisions = decisions.filter((d) => d.t_ms >= cut);
}

function applyHistory(h) {
  intervalMs = h.interval_ms || 1000;
  historyNow = h.now_ms || null;
  for (const [name, s] of Object.entries(h.services || {})) {
    const t = s.t_ms || [];
    const have = hist.get(name);
    // Live samples may have arrived first: keep them, take only older points from history.
    const upto = have && have.t.length ? have.t[0] : Infinity;
    let n = 0;
    while (n < t.length && t[n] < upto) n++;
    const col = (a) => Array.from({ length: n }, (_, i) => (a && a[i] != null ? a[i] : null));
    const fresh = {};
    [t, s.rps, s.errors_per_s, s.p99_ms, s.ready, s.desired].forEach((a, i) => (fresh[KEYS[i]] = col(a)));
    if (have && have.t.length) {
      const before = n ? fresh.desired[n - 1] : null; // a change across the seam is a decision too
      if (before != null && have.desired[0] != null && before !== have.desired[0]) {
        addDecision({ service: name, t_ms: have.t[0], from: before, to: have.desired[0], reason: "scaled" });
      }
      for (const k of KEYS) fresh[k] = fresh[k].concat(have[k]);
    }
    hist.set(name, fresh);
  }
  for (const d of h.decisions || []) addDecision(d);
  prune(last ? last.time_ms : historyNow || Date.now());
  historyLoaded = true;
  scheduleCharts();
}

function applySample(s) {
  if (!s || !Array.isArray(s.services)) return;
  if (last && s.time_ms < last.time_ms) return; // e.g. /overview answering after the stream
  last = s;
  for (const p of s.services) {
    const h = series(p.service);
    const n = h.t.length;
    if (n && s.time_ms <= h.t[n - 1]) continue;
    const prev = n ? h.desired[n - 1] : null;
    if (prev != null && prev !== p.desired) {
      addDecision({ service: p.service, t_ms: s.time_ms, from: prev, to: p.desired, reason: p.autoscale?.reason ?? "scaled" });
    }
    const tr = p.traffic || {};
    const ready = (p.instances || []).filter((i) => i.state === "ready").length;
    [s.time_ms, tr.rps, tr.errors_per_s, tr.p99_ms, ready, p.desired].forEach((v, i) => h[KEYS[i]].push(v ?? null));
  }
  prune(s.time_ms);
  render(s);
  scheduleCharts();
}

async function loadHistory() {
  try { applyHistory(await api("GET", "/history")); } catch (e) { console.warn("history:", e.message); }
}
async function loadOverview() {
  try { applySample(await api("GET", "/overview")); } catch (e) { console.warn("overview:", e.message); }
}

// ---- rendering

function render(s) {
  setText($("#seq"), s.seq);
  setText($("#uptime"), fmtDur((s.uptime_s || 0) * 1000));
  renderAlerts(s.alerts || [], s.time_ms);
  sync($("#services tbody"), svcRows, s.services, (p) => p.service, serviceRow, updateService, "No services", COLS);
  sync($("#queues tbody"), queueRows, s.queues || [], (q) => q.queue, (q) => {
    const r = fieldRow("data-queue", q.queue, QUEUE);
    r.append((r._act = el("td", { class: "actions" })));
    return r;
  }, updateQueue, "No queues", 11);
  sync($("#caches tbody"), cacheRows, s.caches || [], (c) => c.route, (c) => fieldRow("data-cache", c.route, CACHE), (r, c) => {
    fill(r, c, CACHE);
    setAttr(r, "title", `${c.hits} hits, ${c.misses} misses in all`);
  }, "No caches", 6);
  const g = s.gateway || {};
  for (const e of $("#gateway").querySelectorAll("[data-field]")) {
    const v = g[e.dataset.field];
    setText(e, e.dataset.field.endsWith("per_s") ? fmt1(v) : fmtInt(v));
  }
  renderDetail();
}

function renderAlerts(alerts, now) {
  const rank = (a) => (a.state === "firing" ? 0 : 2) + (a.severity === "critical" ? 0 : 1);
  const list = [...alerts].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
  place($("#alerts"), list.length ? list.map((a) => {
    const state = a.state === "firing" ? "firing" : "pending";
    const since = a.since_ms ? ` for ${fmtDur(now - a.since_ms)}` : "";
    return el("div", { class: `alert ${state} ${a.severity === "critical" ? "crit" : "warn"}`, "data-alert": a.name, "data-state": a.state },
      el("b", null, a.name), a.service ? el("span", { class: "tag" }, a.service) : null,
    el("span", { class: "summary" }, a.summary || ""), el("span", { class: "since" }, state + since));
  }) : [el("div", { class: "alert none" }, "No alerts")]);
}

// Keyed rows: existing rows are updated in place (so focus, typed text and expanded state
// survive); `update` may return an extra row to follow its row.
function sync(tbody, map, items, key, make, update, empty, cols) {
  const rows = [], seen = new Set();
  for (const it of items) {
    const k = key(it);
    seen.add(k);
    let r = map.get(k);
    if (!r) map.set(k, (r = make(it)));
    rows.push(r);
    const extra = update(r, it);
    if (extra) rows.push(extra);
  }
  for (const k of map.keys()) if (!seen.has(k)) map.delete(k);
  place(tbody, rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: cols }, empty))]);
}

// Table columns as [data-field, formatter, source key when it differs].
const QUEUE = [["ready", fmtInt], ["delayed", fmtInt], ["in_flight", fmtInt], ["dead", fmtInt], ["oldest_age_seconds", fmtAge],
  ["publish_per_s", fmt1], ["ack_per_s", fmt1], ["retried", fmtInt], ["bytes", fmtBytes]];
const CACHE = [["hit_ratio", fmtPct], ["hits_per_s", fmt1], ["misses_per_s", fmt1], ["stale", fmtInt], ["stored_bytes", fmtBytes]];
const INST = [["pid", fmtInt], ["address", (v) => v || DASH, , "mono"], ["state", String, , "st"], ["uptime", fmtDur, "uptime_ms"],
  ["served", fmtInt], ["in_flight", fmtInt], ["weight", fmtInt], ["ejections", fmtInt], ["ejected", (v) => (v ? "ejected" : "no"), , "ej"]];
const svcRows = new Map(), queueRows = new Map(), cacheRows = new Map();
const COLS = 13;

function fieldRow(attr, name, spec) {
  const f = {};
  const r = el("tr", { [attr]: name }, el("td", { class: "name" }, name),
    ...spec.map(([k, , , cls]) => (f[k] = el("td", { class: cls || "num", "data-field": k }))));
  r._f = f;
  return r;
}
function fill(r, o, spec) {
  for (const [k, fmt, src] of spec) setText(r._f[k], fmt(o[src || k]));
}

function updateQueue(r, q) {
  fill(r, q, QUEUE);
  r._f.dead.classList.toggle("bad", q.dead > 0);
  setAttr(r, "title", `published ${q.published}, delivered ${q.delivered}, acked ${q.acked}, dead-lettered ${q.dead_lettered}, redriven ${q.redriven}`);
  if (!!r._act.firstChild !== q.dead > 0) {
    r._act.replaceChildren(...(q.dead > 0 ? [el("button", { type: "button", "data-action": "redrive", "data-queue": q.queue, title: "Put dead letters back on the queue" }, "Redrive")] : []));
  }
}

// Services: one row per pool plus, when expanded, a row holding its instances.
function serviceRow(p) {
  const name = p.service;
  const f = {};
  const num = (k) => (f[k] = el("td", { class: "num", "data-field": k }));
  const pill = (k) => (f[k] = el("span", { class: "pill " + k, "data-field": k, title: k }));
  f.toggle = el("button", { type: "button", class: "toggle", "data-action": "toggle", "data-service": name, title: "Instances" }, "▸");
  f.badges = el("span", { class: "badges" });
  f.kind = el("td", { class: "kind" });
  f.desired = el("span", { "data-field": "desired" });
  f.range = el("span", { class: "range" });
  f.panic = el("span", { class: "badge bad" }, "panic");
  f.reason = el("span");
  f.scale = el("td", { class: "scale" });
  const tr = el("tr", { class: "svc", "data-service": name },
    el("td", { class: "name" }, f.toggle, name, f.badges), f.kind,
    el("td", { class: "pills" }, pill("ready"), pill("starting"), pill("draining"), pill("unhealthy")),
    el("td", { class: "num" }, f.desired, f.range), el("td", { class: "reason" }, f.panic, f.reason),
    num("rps"), num("error_ratio"), num("p50_ms"), num("p99_ms"), num("in_flight"), num("waiting"), num("requests_total"), f.scale);
  tr._f = f;
  tr._rows = new Map();
  tr._body = el("tbody");
  // Headers starting with # are numeric columns.
  const heads = ["instance", "#pid", "address", "state", "#uptime", "#served", "#in flight", "#weight", "#ejections", "ejected", ""];
  tr._inst = el("tr", { class: "instances-row" }, el("td", { colspan: COLS }, el("table", { class: "grid inst" },
    el("thead", null, el("tr", null, ...heads.map((h) => el("th", { class: h[0] === "#" ? "num" : null }, h.replace("#", ""))))), tr._body)));
  return tr;
}

function updateService(tr, p) {
  const f = tr._f;
  const n = { ready: 0, starting: 0, draining: 0, unhealthy: 0 };
  for (const i of p.instances || []) n[i.state === "stopping" ? "draining" : i.state]++;
  for (const k of ["ready", "starting", "draining", "unhealthy"]) { setText(f[k], n[k]); f[k].classList.toggle("zero", !n[k]); }
  setText(f.kind, p.kind);
  setText(f.desired, fmtInt(p.desired));
  setText(f.range, p.kind === "upstreams" ? "" : ` (${p.min}–${p.max})`);
  const badge = p.crash_looping ? "crash loop" : p.restarts ? `${p.restarts} restarts` : "";
  if (f.badges.textContent !== badge) {
    f.badges.replaceChildren(...(badge ? [el("span", { class: "badge" + (p.crash_looping ? " bad" : ""), title: `${p.failures} failures, ${p.restarts} restarts` }, badge)] : []));
  }
  const a = p.autoscale;
  setText(f.reason, p.kind === "upstreams" ? "static" : a ? a.reason || a.metric : "manual");
  setAttr(f.reason, "title", a ? `${a.reason || ""}\nmetric ${a.metric}, target ${a.target}` : null);
  f.panic.hidden = !(a && a.panic);
  const t = p.traffic || {};
  // A worker pool's work comes from its queue, not through the gateway: no request rates.
  const routed = p.kind !== "worker";
  for (const k of ["rps", "p50_ms", "p99_ms"]) setText(f[k], routed ? fmt1(t[k]) : DASH);
  for (const k of ["in_flight", "waiting"]) setText(f[k], fmtInt(t[k]));
  setText(f.requests_total, routed ? fmtInt(t.requests_total) : DASH);
  setText(f.error_ratio, fmtPct(t.error_ratio));
  f.error_ratio.classList.toggle("bad", t.error_ratio >= 0.05);
  f.error_ratio.classList.toggle("warn", t.error_ratio > 0 && t.error_ratio < 0.05);
  setAttr(f.error_ratio, "title", `${fmt1(t.errors_per_s)} errors/s, ${fmtInt(t.errors_total)} in all`);
  f.waiting.classList.toggle("warn", t.waiting > 0);

  // The scale control exists only for hand-scaled pools and is rebuilt only when that
  // changes, so a number being typed is never lost.
  const scalable = p.kind !== "upstreams" && !a;
  if (tr._scalable !== scalable) {
    tr._scalable = scalable;
    f.scale.replaceChildren(scalable ? el("span", { class: "scale-ctl" },
      el("input", { type: "number", min: 0, step: 1, "data-scale-input": p.service, "aria-label": `Instances of ${p.service}` }),
      el("button", { type: "button", "data-action": "scale", "data-service": p.service }, "Scale"))
      : el("span", { class: "muted" }, a ? "auto" : DASH));
  }
  const input = f.scale.querySelector("input");
  if (input) { setAttr(input, "placeholder", p.desired); setAttr(input, "min", p.min ?? 0); setAttr(input, "max", p.max); }

  const open = expanded.has(p.service);
  setAttr(f.toggle, "aria-expanded", String(open));
  tr.classList.toggle("open", open);
  if (!open) return null;
  sync(tr._body, tr._rows, p.instances || [], (i) => i.id, (i) => instanceRow(p, i), (r, i) => {
    fill(r, i, INST);
    r._f.state.className = "st " + i.state;
    r._f.ejected.classList.toggle("bad", !!i.ejected);
    if (r._drain) r._drain.disabled = !["ready", "starting", "unhealthy"].includes(i.state);
  }, "No instances", 11);
  return tr._inst;
}

function instanceRow(p, i) {
  const r = fieldRow("data-instance", i.id, INST);
  const ids = { type: "button", "data-service": p.service, "data-instance": i.id };
  if (p.kind !== "upstreams") r._drain = el("button", { "data-action": "drain", ...ids, title: "Stop gracefully; the pool starts a replacement" }, "Drain");
  r.append(el("td", { class: "actions" }, r._drain, el("button", { "data-action": "log", ...ids }, "Log")));
  return r;
}

// ---- instance detail panel

let logTimer = 0;
let logBusy = false;

function openDetail(service, instance) {
  detail = { service, instance };
  $("#instance-detail").hidden = false;
  setText($("#detail-title"), `${instance} · ${service}`);
  $("#instance-log").textContent = "";
  setText($("#log-status"), "loading…");
  renderDetail();
  clearInterval(logTimer);
  logTimer = setInterval(fetchLog, 2000);
  fetchLog();
}

function closeDetail() {
  detail = null;
  clearInterval(logTimer);
  $("#instance-detail").hidden = true;
}

function renderDetail() {
  if (!detail || !last) return;
  const p = last.services.find((x) => x.service === detail.service);
  const i = p && (p.instances || []).find((x) => x.id === detail.instance);
  const rows = i ? [["service", `${p.service} (${p.kind})`], ["port", fmtInt(i.port)],
    ...INST.map(([k, fmt, src]) => [k.replace("_", " "), fmt(i[src || k])])] : [["state", "gone: no longer in the pool"]];
  const dl = $("#detail-fields");
  const text = rows.map((r) => r.join(":")).join("|");
  if (dl._text !== text) { // rebuild only when something changed
    dl._text = text;
    dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
  }
}

async function fetchLog() {
  if (!detail || logBusy) return;
  const d = detail;
  logBusy = true;
  try {
    const r = await api("GET", `/services/${enc(d.service)}/instances/${enc(d.instance)}/log`);
    if (detail !== d) return;
    const pre = $("#instance-log");
    const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24; // follow the tail
    setText(pre, r?.lines?.length ? r.lines.join("\n") : "(no output)");
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    setText($("#log-status"), "updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (detail === d) setText($("#log-status"), "log unavailable: " + e.message);
  } finally {
    logBusy = false;
  }
}

// ---- charts

const W = 300, H = 86, PL = 34, PR = 6, PT = 6, PB = 15; // viewBox and plot padding
const CHARTS = [
  { label: "requests/s", lines: [{ key: "rps", cls: "c-rps", area: true }] },
  { label: "errors/s", lines: [{ key: "err", cls: "c-err", area: true }] },
  { label: "p99 ms", lines: [{ key: "p99", cls: "c-p99" }] },
  { label: "instances", int: true, marks: true, lines: [{ key: "ready", cls: "c-ready" }, { key: "desired", cls: "c-desired", step: true }] },
];
const chartBlocks = new Map();
let chartTimer = 0;
let lastDraw = 0;

// Redraws at most once per second however fast data arrives.
function scheduleCharts() {
  if (chartTimer) return;
  chartTimer = setTimeout(() => { chartTimer = 0; lastDraw = Date.now(); drawCharts(); }, Math.max(0, lastDraw + 1000 - Date.now()));
}

function niceCeil(v, int) {
  if (!(v > 0)) return 1;
  const e = Math.pow(10, Math.floor(Math.log10(v)));
  const f = v / e;
  const n = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * e;
  return int ? Math.max(1, Math.ceil(n)) : n;
}
const fmtAxis = (v) => (v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k" : String(+v.toPrecision(3)));

function chartBlock(name) {
  const figs = CHARTS.map((c) => {
    const value = el("span", { class: "value" });
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `${name} ${c.label}` });
    const fig = el("figure", null, el("figcaption", null, el("span", null, c.label), value), s);
    return { fig, value, svg: s };
  });
  const b = el("div", { class: "chart-block", "data-chart": name }, el("h3", null, name), el("div", { class: "chart-row" }, ...figs.map((f) => f.fig)));
  b._figs = figs;
  return b;
}

function drawCharts() {
  const names = last ? last.services.map((p) => p.service) : [...hist.keys()];
  const now = last ? last.time_ms : historyNow || Date.now();
  const blocks = names.map((name) => {
    let b = chartBlocks.get(name);
    if (!b) chartBlocks.set(name, (b = chartBlock(name)));
    const h = hist.get(name) || series(name);
    const lastOf = (k) => { for (let i = h[k].length - 1; i >= 0; i--) if (h[k][i] != null) return h[k][i]; return null; };
    CHARTS.forEach((c, i) => {
      const f = b._figs[i];
      setText(f.value, c.int ? `${fmtInt(lastOf("ready"))} ready / ${fmtInt(lastOf("desired"))} desired` : fmt1(lastOf(c.lines[0].key)));
      drawChart(f.svg, c, h, now, c.marks ? decisions.filter((d) => d.service === name) : []);
    });
    return b;
  });
  for (const k of chartBlocks.keys()) if (!names.includes(k)) chartBlocks.delete(k);
  place($("#charts"), blocks.length ? blocks : [el("p", { class: "muted" }, "No data yet")]);
}

function drawChart(s, c, h, now, marks) {
  const t0 = now - WINDOW_MS;
  const gap = Math.max(3 * intervalMs, 3000); // a longer silence is drawn as a gap
  let max = 0, any = false;
  for (const l of c.lines) h[l.key].forEach((v, i) => { if (v != null && h.t[i] >= t0) { any = true; if (v > max) max = v; } });
  const top = niceCeil(max, c.int);
  const x = (t) => PL + ((t - t0) / WINDOW_MS) * (W - PL - PR);
  const base = H - PB;
  const y = (v) => base - (v / top) * (base - PT);
  const kids = [PT, (PT + base) / 2, base].map((gy) => svg("line", { class: "axis", x1: PL, x2: W - PR, y1: gy, y2: gy }));
  const label = (x, y, text, anchor = "end") => kids.push(svg("text", { class: "lbl", x, y, "text-anchor": anchor }, text));
  label(PL - 4, PT + 3, fmtAxis(top));
  label(PL - 4, base + 3, "0");
  label(PL, H - 3, "15 min ago", "start");
  label(W - PR, H - 3, "now");
  for (const l of c.lines) {
    // Split into runs of consecutive non-null points.
    const runs = [];
    let run = null, prevT = -Infinity;
    h[l.key].forEach((v, i) => {
      const t = h.t[i];
      if (t < t0 || v == null || !isFinite(v)) { run = null; return; }
      if (!run || t - prevT > gap) runs.push((run = []));
      run.push([x(t).toFixed(1), y(Math.min(v, top)).toFixed(1)]);
      prevT = t;
    });
    if (!runs.length) continue;
    const d = runs.map((r) => {
      let out = `M${r[0][0]} ${r[0][1]}`;
      if (r.length === 1) return out + "h0.01"; // a lone point still shows as a dot
      for (let i = 1; i < r.length; i++) {
        if (!l.step) out += `L${r[i][0]} ${r[i][1]}`;
        else if (r[i][1] !== r[i - 1][1]) out += `H${r[i][0]}V${r[i][1]}`; // steps only where it changes
      }
      return l.step ? out + `H${r[r.length - 1][0]}` : out;
    }).join("");
    if (l.area) {
      const a = runs.filter((r) => r.length > 1).map((r) => `M${r[0][0]} ${base}L` + r.map((p) => p.join(" ")).join("L") + `L${r[r.length - 1][0]} ${base}Z`).join("");
      if (a) kids.push(svg("path", { class: "area " + l.cls, d: a }));
    }
    kids.push(svg("path", { class: "line " + l.cls, d }));
  }
  for (const m of marks) {
    if (m.t_ms < t0) continue;
    const mx = x(m.t_ms).toFixed(1);
    kids.push(svg("g", { class: "mark" },
      svg("title", null, `${m.from} → ${m.to}: ${m.reason}`),
      svg("line", { x1: mx, x2: mx, y1: PT, y2: base }),
      svg("line", { class: "hit", x1: mx, x2: mx, y1: PT, y2: base }),
      svg("circle", { cx: mx, cy: y(Math.min(m.to, top)).toFixed(1), r: 2.5 })));
  }
  if (!any) label((PL + W - PR) / 2, (PT + base) / 2 + 3, "no data", "middle");
  s.replaceChildren(...kids);
}

// ---- actions

// Runs an action with its button disabled, reporting the outcome in #message.
async function act(btn, fn) {
  if (btn) btn.disabled = true;
  try { say(await fn()); } catch (e) { say(e.message, true); } finally { if (btn) btn.disabled = false; }
}

function scale(service, btn) {
  const input = document.querySelector(`input[data-scale-input="${CSS.escape(service)}"]`);
  const n = Number(input.value);
  if (!input.value.trim() || !Number.isInteger(n) || n < 0) {
    input.focus();
    return say(`Type a whole number of instances for ${service} first`, true);
  }
  act(btn, async () => {
    const r = await api("POST", `/services/${enc(service)}/scale`, { instances: n });
    input.value = "";
    return `${service}: scaling to ${r?.desired ?? n} instances`;
  });
}

function drain(service, instance, btn) {
  if (!window.confirm(`Drain ${instance} of ${service}? It stops gracefully and the pool starts a replacement.`)) return;
  act(btn, async () => {
    await api("POST", `/services/${enc(service)}/instances/${enc(instance)}/drain`, {});
    return `${instance} is draining`;
  });
}

function redrive(queue, btn) {
  act(btn, async () => {
    const r = await api("POST", `/queues/${enc(queue)}/dead/redrive`);
    return `${queue}: ${r?.redriven ?? "dead"} messages put back on the queue`;
  });
}

function purge(btn) {
  const input = $("#purge-prefix");
  const prefix = input.value.trim();
  if (!prefix) return input.focus(), say("Type the URL prefix to purge first", true);
  if (!window.confirm(`Purge every cached response whose URL starts with\n${prefix} ?`)) return;
  act(btn, async () => {
    const r = await api("POST", "/cache/purge", { prefix });
    return `Purged ${r?.purged ?? "?"} cached responses${r?.soft ? " (marked stale)" : ""}`;
  });
}

function toggle(service) {
  if (expanded.has(service)) expanded.delete(service);
  else expanded.add(service);
  if (last) render(last);
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("[data-action]");
  if (!b) {
    // A click anywhere on a service row (not on its controls) opens its instances.
    const tr = e.target.closest("#services tr.svc");
    if (tr && !e.target.closest("input, button, a")) toggle(tr.dataset.service);
    if (e.target.closest("#message")) $("#message").hidden = true;
    return;
  }
  const d = b.dataset;
  switch (d.action) {
    case "scale": scale(d.service, b); break;
    case "drain": drain(d.service, d.instance, b); break;
    case "log": openDetail(d.service, d.instance); break;
    case "redrive": redrive(d.queue, b); break;
    case "toggle": toggle(d.service); break;
    case "close-detail": closeDetail(); break;
    // "purge" is a submit button: handled by the form's submit event below.
  }
});

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && e.target.matches("[data-scale-input]")) {
    e.preventDefault();
    const svc = e.target.dataset.scaleInput;
    scale(svc, document.querySelector(`button[data-action="scale"][data-service="${CSS.escape(svc)}"]`));
  } else if (e.key === "Escape" && detail) closeDetail();
});

on("#purge-form", "submit", (e) => {
  e.preventDefault();
  purge(e.submitter || $('[data-action="purge"]'));
});

on("#token-form", "submit", (e) => {
  e.preventDefault();
  const input = $("#token-input");
  token = input.value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  input.value = "";
  input.placeholder = token ? "token saved" : "admin token";
  $("#auth-needed").hidden = true;
  say(token ? "Token saved" : "Token cleared");
  // Start over with the new token.
  backoff = 1000;
  connect();
  if (!historyLoaded) loadHistory();
  if (!last) loadOverview();
});

// ---- start

if (token) $("#token-input").placeholder = "token saved";
drawCharts();
loadHistory();
loadOverview();
connect();
