// ferry's operator console: plain JavaScript over the operator API. Every value from the API is
// written with textContent (never as HTML). The operator's token lives in this tab's
// sessionStorage only and goes out as a bearer token.
"use strict";

const PAGE = 50;
const REFRESH_MS = 5000;
const STATES = ["clash", "missing", "behind", "silent", "healthy"];
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem("ferry-operator-token") || "";
// Each device's backlog as last seen by this page, for its drain rate: id -> [time s, waiting].
const seen = new Map();
let offset = 0;
let timer = null;

class Unauthorized extends Error {}

// The NDJSON lines of `path`, parsed.
async function apiLines(path) {
  const response = await fetch(path, { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (response.status === 401) throw new Unauthorized("the operator token was refused");
  if (!response.ok) throw new Error(path + ": " + response.status);
  const text = await response.text();
  return text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) throw new Unauthorized("the operator token was refused");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(path + ": " + response.status + " " + (body.error || ""));
  return body;
}

function show(section) {
  for (const id of ["login", "fleet", "device"]) $(id).hidden = id !== section;
  $("sign-out").hidden = section === "login" || !token;
}

function fail(e) {
  if (e instanceof Unauthorized) {
    $("login-error").textContent = token ? "That token was refused." : "";
    show("login");
    return;
  }
  $("error").textContent = String(e.message || e);
}

// Ages and amounts, with units.
function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
const count = (n) => (n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"));
const nowS = () => Date.now() / 1000;

// A size in bytes, with its unit.
function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = bytes, i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function badges(states) {
  const span = el("span");
  for (const s of states) span.appendChild(el("span", { class: "badge " + s }, s));
  return span;
}

// --- the fleet -----------------------------------------------------------------------------

function query() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  return { state: q.get("state") || "", prefix: q.get("prefix") || "", sort: q.get("sort") || "id" };
}

function setQuery(q) {
  const p = new URLSearchParams();
  if (q.state) p.set("state", q.state);
  if (q.prefix) p.set("prefix", q.prefix);
  if (q.sort && q.sort !== "id") p.set("sort", q.sort);
  const text = p.toString();
  offset = 0;
  location.hash = "#/" + (text ? "?" + text : "");
}

async function loadFleet() {
  const q = query();
  $("f-state").value = q.state;
  $("f-prefix").value = q.prefix;
  $("f-sort").value = q.sort;
  for (const t of document.querySelectorAll(".tile")) {
    t.classList.toggle("selected", t.dataset.state === q.state);
  }
  const params = new URLSearchParams({ sort: q.sort, offset: String(offset), limit: String(PAGE) });
  if (q.state) params.set("state", q.state);
  if (q.prefix) params.set("prefix", q.prefix);
  const [fleet, page] = await Promise.all([api("/v1/fleet"), api("/v1/devices?" + params)]);
  drawOverview(fleet);
  drawTable(page);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  $("error").textContent = "";
}

function drawOverview(f) {
  document.querySelector('[data-count="all"]').textContent = count(f.devices);
  for (const s of STATES) document.querySelector(`[data-count="${s}"]`).textContent = count(f.by_state[s]);
  $("backlog").textContent = count(f.waiting) + " records";
  $("oldest").textContent = f.oldest_unsent_age_s === null ? "none" : age(f.oldest_unsent_age_s) + " old";

  const rates = f.rate || [];
  $("rate-now").textContent = count(Math.round(rates.length ? rates[rates.length - 1] : 0)) + " records/s";
  const chart = $("rate-chart");
  chart.replaceChildren();
  const top = Math.max(1, ...rates);
  const points = rates.map((r, i) => `${(i / Math.max(1, rates.length - 1)) * 600},${115 - (r / top) * 105}`);
  chart.appendChild(svg("polyline", { points: points.join(" "), fill: "none", stroke: "#1d2329", "stroke-width": "2" }));
  const label = svg("text", { x: "4", y: "14", "font-size": "12", fill: "#66717c" });
  label.textContent = "peak " + count(Math.round(top)) + " records/s";
  chart.appendChild(label);

  const ages = f.backlog_age.devices;
  const bounds = f.backlog_age.le_s;
  const ageChart = $("age-chart");
  ageChart.replaceChildren();
  const most = Math.max(1, ...ages);
  const w = 600 / ages.length;
  ages.forEach((n, i) => {
    const h = (n / most) * 100;
    ageChart.appendChild(svg("rect", { x: String(i * w + 4), y: String(115 - h), width: String(w - 8), height: String(h), fill: i >= 4 ? "#c62828" : "#b26a00" }));
    const t = svg("text", { x: String(i * w + w / 2), y: String(110 - h), "font-size": "12", "text-anchor": "middle" });
    t.textContent = count(n);
    ageChart.appendChild(t);
  });
  const axis = $("age-axis");
  axis.replaceChildren();
  bounds.forEach((b) => axis.appendChild(el("span", {}, "≤ " + age(b))));
  axis.appendChild(el("span", {}, "older"));
}

// How fast a device's backlog drains, from the waiting counts this page saw of it, and when it
// will be empty at that rate: "120 records/s, 2 min" (or "-" before two readings or while it grows).
function drain(id, waiting) {
  const now = nowS();
  const before = seen.get(id);
  if (!before || before[1] !== waiting) seen.set(id, [now, waiting]);
  if (waiting === 0) return "-";
  if (!before || now - before[0] < 1) return "measuring";
  const rate = (before[1] - waiting) / (now - before[0]);
  if (rate <= 0) return before[1] === waiting ? "stalled" : "growing";
  return `${count(Math.round(rate))} records/s, ${age(waiting / rate)}`;
}

function drawTable(page) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of page.devices) {
    const l = d.ledger;
    const tr = el("tr", { "data-device": d.device_id, class: d.states.join(" ") });
    const link = el("a", { href: "#/device/" + encodeURIComponent(d.device_id) }, d.device_id);
    const first = el("td");
    first.appendChild(link);
    tr.appendChild(first);
    const states = el("td");
    states.appendChild(badges(d.states));
    tr.appendChild(states);
    tr.appendChild(el("td", {}, d.last_seen_ms ? age(nowS() - d.last_seen_ms / 1000) + " ago" : "-"));
    tr.appendChild(el("td", { class: "num" }, count(l.waiting)));
    tr.appendChild(el("td", { class: "num bytes" }, l.waiting > 0 && l.backlog_bytes != null ? size(l.backlog_bytes) : "-"));
    tr.appendChild(el("td", {}, l.waiting > 0 && l.oldest_unsent_ts_ms ? age(nowS() - l.oldest_unsent_ts_ms / 1000) : "-"));
    tr.appendChild(el("td", { class: "num drain" }, drain(d.device_id, l.waiting)));
    const pct = l.head_seq ? ((100 * l.delivered) / l.head_seq).toFixed(l.delivered === l.head_seq ? 0 : 1) : "100";
    tr.appendChild(el("td", { class: "num" }, `${count(l.delivered)} / ${count(l.head_seq)} (${pct} %)`));
    const gaps = Object.entries(l.gaps).map(([r, n]) => `${count(n)} ${r}`).join(", ");
    tr.appendChild(el("td", { class: "num" }, gaps || "0"));
    tr.appendChild(el("td", { class: "num" }, count(l.missing)));
    const downlink = el("td", { class: "downlink" });
    if (d.downlink_connected === true) downlink.appendChild(el("span", { class: "badge connected" }, "connected"));
    else downlink.textContent = d.downlink_connected === false ? "-" : "unknown";
    tr.appendChild(downlink);
    body.appendChild(tr);
  }
  const last = Math.min(page.total, offset + page.devices.length);
  $("page-info").textContent = page.total ? `${count(offset + 1)}-${count(last)} of ${count(page.total)} devices` : "no device";
  $("prev").disabled = offset === 0;
  $("next").disabled = last >= page.total;
}

// --- one device ----------------------------------------------------------------------------

let device = "";

async function loadDevice(id) {
  device = id;
  $("d-id").textContent = id;
  const [ledger, history, listed, downlink, records, commands] = await Promise.all([
    api(`/v1/devices/${encodeURIComponent(id)}/ledger`),
    api(`/v1/devices/${encodeURIComponent(id)}/history`),
    api(`/v1/devices?prefix=${encodeURIComponent(id)}&limit=1`),
    api(`/v1/devices/${encodeURIComponent(id)}/downlink`).catch(() => null),
    apiLines(`/v1/devices/${encodeURIComponent(id)}/records?last=20`),
    api(`/v1/devices/${encodeURIComponent(id)}/commands`).catch(() => ({ commands: [] })),
  ]);
  drawRecords(records);
  drawHistory(history);
  drawCommands(commands.commands);
  const summary = listed.devices.find((d) => d.device_id === id);
  $("d-states").replaceChildren(badges(ledger.states));
  const dl = $("d-downlink");
  if (downlink && downlink.connected) {
    dl.className = "badge connected";
    dl.textContent = "downlink connected";
  } else {
    dl.className = "badge";
    dl.textContent = "downlink not connected";
  }
  $("d-head").textContent = count(ledger.head_seq);
  drawLedger(ledger, summary ? summary.gaps : []);
  const facts = $("d-facts");
  facts.replaceChildren();
  const gapText = Object.entries(ledger.gaps).map(([r, n]) => `${count(n)} ${r}`).join(", ") || "none";
  for (const [k, v] of [
    ["delivered", count(ledger.delivered) + " records"],
    ["declared gaps", gapText],
    // The bytes are the gateway's report, taken with the upload that may have just delivered
    // them: said only while records wait, as in the table.
    ["waiting on the gateway", count(ledger.waiting) + " records" + (ledger.waiting && ledger.backlog_bytes != null ? " (" + size(ledger.backlog_bytes) + " in its journal)" : "") + (ledger.waiting ? ", oldest " + age(nowS() - (ledger.oldest_unsent_ts_ms || 0) / 1000) + " old" : "")],
    ["missing", count(ledger.missing) + " records" + (ledger.missing ? " (an alarm)" : "")],
    ["upstream gaps", ledger.upstream_gaps ? count(ledger.upstream_gaps) + " reported by the gateway (records on $ferry/upstream_gap)" : "none reported"],
    ["gateway's cursor", "seq " + count(ledger.acked_seq)],
    ["last seen", ledger.last_seen_ms ? age(nowS() - ledger.last_seen_ms / 1000) + " ago" : "-"],
    ["account", ledger.balanced ? "balanced" : "NOT balanced"],
  ]) {
    const tr = el("tr");
    tr.appendChild(el("td", { class: "dim" }, k));
    tr.appendChild(el("td", {}, v));
    facts.appendChild(tr);
  }
  $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  $("error").textContent = "";
}

// The device's account per minute (GET .../history): records stored per second, the backlog,
// and the ledger's shares, on one time axis from its first point (at least ten minutes back) to
// now. A minute without a point stored nothing and left the account as it was.
function drawHistory(h) {
  const slot = h.slot_s * 1000;
  const now = Date.now();
  const points = h.points;
  const start = Math.min(now - 10 * 60000, points.length ? points[0].t_ms : now);
  const minutes = Math.max(1, Math.ceil((now - start) / slot));
  const x = (t) => ((t - start) / (minutes * slot)) * 600;
  const w = Math.max(1, 600 / minutes - 1);
  for (const s of document.querySelectorAll(".d-span")) s.textContent = "last " + age((now - start) / 1000);
  for (const a of document.querySelectorAll(".d-axis")) {
    a.replaceChildren(el("span", {}, age((now - start) / 1000) + " ago"), el("span", {}, "now"));
  }
  const perSecond = (p) => p.accepted / Math.max(1, Math.min(slot, now - p.t_ms) / 1000);

  const rate = $("d-throughput");
  rate.replaceChildren();
  const top = Math.max(1, ...points.map(perSecond));
  for (const p of points) {
    const r = perSecond(p);
    const bar = svg("rect", { x: String(x(p.t_ms)), y: String(115 - (r / top) * 100), width: String(w), height: String((r / top) * 100), fill: "#1d2329" });
    bar.setAttribute("data-accepted", String(p.accepted));
    const t = svg("title", {});
    t.textContent = `${new Date(p.t_ms).toISOString().slice(11, 16)} UTC: ${count(p.accepted)} records (${count(Math.round(r))} records/s)`;
    bar.appendChild(t);
    rate.appendChild(bar);
  }
  const label = svg("text", { x: "4", y: "14", "font-size": "12", fill: "#66717c" });
  label.textContent = "peak " + count(Math.round(top)) + " records/s";
  rate.appendChild(label);
  const last = points.length ? points[points.length - 1] : null;
  $("d-rate-now").textContent = last && now - last.t_ms < slot ? count(Math.round(perSecond(last))) + " records/s" : "0 records/s";

  // The backlog: per minute a bar of the most records waiting in it, and a step line of what
  // each minute ended with, held until the next point.
  const backlog = $("d-backlog");
  backlog.replaceChildren();
  const most = Math.max(1, ...points.map((p) => p.waiting_max));
  const y = (n) => 115 - (n / most) * 100;
  let path = "";
  points.forEach((p, i) => {
    const end = i + 1 < points.length ? points[i + 1].t_ms : now;
    path += `${i ? "L" : "M"}${x(p.t_ms)},${y(p.waiting)} L${x(end)},${y(p.waiting)} `;
    const mark = svg("rect", { x: String(x(p.t_ms)), y: String(y(p.waiting_max)), width: String(w), height: String(115 - y(p.waiting_max)), fill: "#b26a00", "fill-opacity": "0.35" });
    mark.setAttribute("data-waiting", String(p.waiting_max));
    const t = svg("title", {});
    t.textContent = `${new Date(p.t_ms).toISOString().slice(11, 16)} UTC: up to ${count(p.waiting_max)} records waiting, ${count(p.waiting)} at the end` + (p.waiting && p.backlog_bytes != null ? ` (${size(p.backlog_bytes)})` : "");
    mark.appendChild(t);
    backlog.appendChild(mark);
  });
  if (path) backlog.appendChild(svg("path", { d: path, fill: "none", stroke: "#b26a00", "stroke-width": "2" }));
  const peak = svg("text", { x: "4", y: "14", "font-size": "12", fill: "#66717c" });
  peak.textContent = "peak " + count(most) + " records";
  backlog.appendChild(peak);
  $("d-backlog-now").textContent = last ? count(last.waiting) + " records" + (last.waiting && last.backlog_bytes != null ? ", " + size(last.backlog_bytes) : "") : "-";

  // The ledger's shares per minute, stacked: delivered at the bottom, then gaps, waiting, missing.
  const shares = $("d-ledger-time");
  shares.replaceChildren();
  for (const p of points) {
    const total = p.delivered + p.gaps + p.waiting + p.missing;
    if (!total) continue;
    let top = 120;
    for (const [n, colour, what] of [[p.delivered, "#2e7d32", "delivered"], [p.gaps, "#90a4ae", "gaps"], [p.waiting, "#b26a00", "waiting"], [p.missing, "#c62828", "missing"]]) {
      if (!n) continue;
      const h = (n / total) * 120;
      top -= h;
      const r = svg("rect", { x: String(x(p.t_ms)), y: String(top), width: String(w), height: String(h), fill: colour });
      r.setAttribute("data-kind", what);
      const t = svg("title", {});
      t.textContent = `${new Date(p.t_ms).toISOString().slice(11, 16)} UTC: ${count(n)} ${what}`;
      r.appendChild(t);
      shares.appendChild(r);
    }
  }
}

function drawCommands(commands) {
  const body = document.querySelector("#d-commands tbody");
  body.replaceChildren();
  for (const c of commands) {
    const tr = el("tr", { "data-command": c.id });
    tr.appendChild(el("td", {}, c.queued_ms ? age(nowS() - c.queued_ms / 1000) + " ago" : "-"));
    tr.appendChild(el("td", { class: "by" }, c.by || "-"));
    tr.appendChild(el("td", { class: "action" }, c.action || "?"));
    tr.appendChild(el("td", { class: "state" }, c.state));
    tr.appendChild(el("td", { class: "num" }, count(c.sent)));
    let outcome = "";
    if (c.result) outcome = c.result.ok ? "ok" : "refused: " + (c.result.error || "");
    tr.appendChild(el("td", {}, outcome));
    body.appendChild(tr);
  }
}

function drawRecords(records) {
  const body = document.querySelector("#d-records tbody");
  body.replaceChildren();
  for (const r of records.slice().reverse()) {
    const tr = el("tr");
    tr.appendChild(el("td", { class: "num" }, count(r.seq)));
    tr.appendChild(el("td", {}, r.ts_ms ? new Date(r.ts_ms).toISOString().replace("T", " ").slice(0, 23) + " UTC" : "-"));
    tr.appendChild(el("td", {}, r.topic || ""));
    let payload = "";
    if (r.payload_text !== undefined) payload = r.payload_text;
    else if (r.payload !== undefined) payload = JSON.stringify(r.payload);
    else if (r.payload_b64 !== undefined) payload = "base64 " + r.payload_b64;
    tr.appendChild(el("td", { class: "payload" }, payload.length > 200 ? payload.slice(0, 200) + "..." : payload));
    body.appendChild(tr);
  }
}

function drawLedger(ledger, gaps) {
  const pic = $("d-ledger");
  pic.replaceChildren();
  const head = Math.max(1, ledger.head_seq);
  const x = (seq) => ((seq - 1) / head) * 1000;
  const band = (from, to, colour, what) => {
    const r = svg("rect", { x: String(x(from)), y: "0", width: String(Math.max(1, x(to + 1) - x(from))), height: "40", fill: colour });
    r.setAttribute("data-kind", what);
    const title = svg("title", {});
    title.textContent = `${what}: ${from}..${to}`;
    r.appendChild(title);
    pic.appendChild(r);
  };
  if (ledger.head_seq > 0) band(1, ledger.head_seq, "#2e7d32", "delivered");
  for (const g of gaps) band(g.from_seq, g.to_seq, "#90a4ae", "gap " + g.reason);
  for (const [a, b] of ledger.waiting_ranges) band(a, b, "#b26a00", "waiting");
  for (const [a, b] of ledger.missing_ranges) band(a, b, "#c62828", "missing");
}

function commandBody() {
  const action = $("c-action").value;
  switch (action) {
    case "publish":
      return { action, topic: $("c-topic").value, payload_text: $("c-payload").value };
    case "set_config": {
      const raw = $("c-value").value;
      const value = raw !== "" && !isNaN(Number(raw)) ? Number(raw) : raw;
      return { action, key: $("c-key").value, value };
    }
    case "replay_from":
      return { action, seq: Number($("c-seq").value) };
    default:
      return { action };
  }
}

// What a command will do, said before it is sent; `null` for one that changes nothing.
function consequence(body) {
  switch (body.action) {
    case "publish":
      return `Publish ${body.payload_text.length} bytes to topic "${body.topic}" on ${device}'s broker?`;
    case "set_config":
      return `Set ${body.key} to ${body.value} on ${device} (written to its config file)?`;
    case "replay_from":
      return $("c-preview").textContent + " Go ahead?";
    default:
      return null;
  }
}

async function previewReplay() {
  if ($("c-action").value !== "replay_from") {
    $("c-preview").textContent = "";
    return;
  }
  const seq = Number($("c-seq").value);
  const ledger = await api(`/v1/devices/${encodeURIComponent(device)}/ledger`);
  if (!seq || seq > ledger.acked_seq) {
    $("c-preview").textContent = `Nothing to re-send: the gateway's cursor is at seq ${ledger.acked_seq}.`;
  } else {
    const n = ledger.acked_seq - seq + 1;
    $("c-preview").textContent = `Re-sends seqs ${seq}..${ledger.acked_seq} (${count(n)} records) from the gateway's journal, if it still holds them; the center counts them as duplicates.`;
  }
}

async function sendCommand(ev) {
  ev.preventDefault();
  const body = commandBody();
  const question = consequence(body);
  if (question !== null && !window.confirm(question)) return;
  $("command-result").textContent = "";
  $("command-state").textContent = "sending...";
  const path = `/v1/devices/${encodeURIComponent(device)}/commands`;
  const queued = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  $("command-state").textContent = `command ${queued.id}: pending`;
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    const state = await api(`${path}/${encodeURIComponent(queued.id)}`);
    if (state.state === "done") {
      $("command-state").textContent = `command ${queued.id}: done`;
      $("command-result").textContent = JSON.stringify(state.result, null, 2);
      return;
    }
    $("command-state").textContent = `command ${queued.id}: pending (sent ${state.sent} times)`;
    await new Promise((r) => setTimeout(r, 500));
  }
  $("command-state").textContent = `command ${queued.id}: no result after 2 minutes; it stays queued`;
}

// --- routing -------------------------------------------------------------------------------

async function route() {
  clearTimeout(timer);
  if (!token && !(await openWithoutToken())) {
    show("login");
    return;
  }
  const hash = location.hash || "#/";
  try {
    if (hash.startsWith("#/device/")) {
      const id = decodeURIComponent(hash.slice("#/device/".length));
      show("device");
      $("where").textContent = "device";
      await loadDevice(id);
    } else {
      show("fleet");
      $("where").textContent = "fleet";
      await loadFleet();
    }
  } catch (e) {
    fail(e);
    if (e instanceof Unauthorized) return;
  }
  // Refreshed whatever this round's outcome: a database away for a moment is seen coming back.
  timer = setTimeout(route, REFRESH_MS);
}

// A console on loopback without operators needs no token.
async function openWithoutToken() {
  try {
    await api("/v1/fleet");
    return true;
  } catch (e) {
    return false;
  }
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("ferry-operator-token", token);
  $("token").value = "";
  route();
});
$("sign-out").addEventListener("click", () => {
  token = "";
  sessionStorage.removeItem("ferry-operator-token");
  show("login");
});
$("f-state").addEventListener("change", () => setQuery(Object.assign(query(), { state: $("f-state").value })));
$("f-sort").addEventListener("change", () => setQuery(Object.assign(query(), { sort: $("f-sort").value })));
$("f-prefix").addEventListener("change", () => setQuery(Object.assign(query(), { prefix: $("f-prefix").value })));
$("filters").addEventListener("submit", (ev) => ev.preventDefault());
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); route(); });
$("next").addEventListener("click", () => { offset += PAGE; route(); });
$("c-action").addEventListener("change", () => {
  $("command-form").dataset.action = $("c-action").value;
  previewReplay().catch(fail);
});
$("c-seq").addEventListener("input", () => previewReplay().catch(fail));
$("command-form").addEventListener("submit", (ev) => sendCommand(ev).catch(fail));
window.addEventListener("hashchange", () => { offset = 0; route(); });
$("command-form").dataset.action = $("c-action").value;
route();
