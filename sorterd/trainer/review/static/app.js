// The review page (§3.1): two keys a stone, flags one key each, undo, counts always visible.
// Plain browser JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const COLORS = [["1", "blue"], ["2", "light"], ["3", "inky"]];
const CLARITIES = [["q", "transparent"], ["w", "translucent"], ["e", "opaque"]];
const FLAGS = [["a", "uncertain"], ["m", "mixed"], ["d", "damaged"]];
const OTHER = [["r", "reject: not a sapphire (sends the stone)"], ["s", "skip: no class (sends the stone)"],
  ["u / Ctrl-Z", "undo the last label (repeat for more)"], ["f", "full frames on/off"],
  ["n", "type a note (Enter: back to keys)"]];

// sent: stones this page has labelled or skipped (a queue fetched before the server had the label
// must not show them again); asked: the newest queue request (an older answer arriving after it is
// dropped: two fetches race when the name is confirmed by Enter and by the change it fires).
const state = { queue: [], current: null, color: null, clarity: null, flags: new Set(), busy: 0,
  sent: new Set(), asked: 0, loadedFor: null };
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function annotator() { return $("annotator").value.trim(); }
function mode() { return $("mode").value; }
function say(text) { $("status").textContent = text; }

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  return { ok: res.ok, status: res.status, data };
}

function keyButton(key, name, on) {
  const b = document.createElement("span");
  b.className = "key" + (on ? " on" : "");
  b.innerHTML = `<b>${key}</b>${name}`;
  b.dataset.key = key;
  b.addEventListener("click", () => press(key));
  return b;
}

function renderChoice() {
  for (const [id, list, sel] of [["colors", COLORS, state.color], ["clarities", CLARITIES, state.clarity]]) {
    const row = $(id); row.replaceChildren();
    for (const [k, n] of list) row.appendChild(keyButton(k, n, sel === n));
  }
  const flags = $("flags"); flags.replaceChildren();
  for (const [k, n] of FLAGS) flags.appendChild(keyButton(k, n, state.flags.has(n)));
  flags.appendChild(keyButton("r", "reject", false));
  flags.appendChild(keyButton("s", "skip", false));
}

function bars(title, names, probs) {
  const box = document.createElement("div");
  box.innerHTML = `<h3>${title}</h3>`;
  names.forEach((n, i) => {
    const p = probs ? probs[i] : 0;
    const row = document.createElement("div"); row.className = "bar";
    row.innerHTML = `<span>${n}</span><div style="width:${Math.round(p * 300)}px"></div><i>${(100 * p).toFixed(0)} %</i>`;
    box.appendChild(row);
  });
  return box;
}

function show() {
  const s = state.current;
  state.color = null; state.clarity = null; state.flags = new Set(); $("notes").value = "";
  renderChoice();
  if (!s) {
    $("stone-id").textContent = "no stones to label"; $("stone-info").textContent = "";
    for (const id of ["backlit", "toplit", "backlit-full", "toplit-full"]) $(id).removeAttribute("src");
    $("probs").replaceChildren();
    return;
  }
  $("stone-id").textContent = s.stone_id;
  const boosts = (s.boosts || []).join(", ");
  $("stone-info").textContent = `· ${s.size_mm ?? "?"} mm · lot ${s.lot_id} · sorter ${s.sorter_id} · priority ` +
    `${(s.priority ?? 0).toFixed(2)}${boosts ? " (" + boosts + ")" : ""} · model says ${s.predicted ?? "?"}`;
  $("backlit").src = s.images.backlit_crop; $("toplit").src = s.images.toplit_crop;
  if (!$("full").hidden) showFull();
  $("probs").replaceChildren(bars("colour", COLORS.map((c) => c[1]), s.p_color),
    bars("clarity", CLARITIES.map((c) => c[1]), s.p_clarity));
}

function showFull() {
  const s = state.current;
  if (s) { $("backlit-full").src = s.images.backlit_full; $("toplit-full").src = s.images.toplit_full; }
}

async function loadQueue() {
  const ticket = ++state.asked;
  if (!annotator()) {
    say("enter your name first"); state.queue = []; state.current = null; show();
    $("stone-id").textContent = "enter your name first";  // not "no stones": nothing was asked for yet
    return;
  }
  state.loadedFor = `${annotator()}|${mode()}`;
  const r = await api("GET", `/api/queue?annotator=${encodeURIComponent(annotator())}&limit=100&mode=${mode()}`);
  if (ticket !== state.asked) return;  // a newer request was made meanwhile: its answer counts
  if (!r.ok) { say(r.data ? r.data.error : `queue: HTTP ${r.status}`); return; }
  state.queue = r.data.items.filter((it) => !state.sent.has(it.stone_id));
  state.current = state.queue.shift() || null;
  show();
}

async function send(color, clarity, extra) {
  const s = state.current;
  if (!s || !annotator()) { say(annotator() ? "no stone" : "enter your name first"); return; }
  const body = { stone_id: s.stone_id, annotator: annotator(), color, clarity, notes: $("notes").value,
    uncertain: state.flags.has("uncertain"), mixed: state.flags.has("mixed"), damaged: state.flags.has("damaged"),
    reject: false, ...extra };
  if (mode() === "spot") body.check = "spot";
  state.sent.add(s.stone_id);
  state.current = state.queue.shift() || null;  // advance at once: the next stone is already loaded
  show();
  state.busy++;
  const r = await api("POST", "/api/labels", body);
  state.busy--;
  if (!r.ok) {
    state.sent.delete(s.stone_id);  // not saved: it may come back in the queue
    say(`${s.stone_id}: ${r.data ? r.data.error : "HTTP " + r.status}`);
  } else {
    say(`${s.stone_id}: ${color ?? (extra.reject ? "reject" : "skipped")}${clarity ? " " + clarity : ""} saved`);
  }
  if (!state.current && state.busy === 0) await loadQueue();
  refreshCounts();
}

async function undo() {
  if (!annotator()) { say("enter your name first"); return; }
  const r = await api("POST", "/api/undo", { annotator: annotator() });
  if (!r.ok) { say(r.data ? r.data.error : `undo: HTTP ${r.status}`); return; }
  say(`undone: ${r.data.stone_id} (${r.data.color ?? "no class"} ${r.data.clarity ?? ""})`);
  state.sent.delete(r.data.stone_id);  // unlabelled again: it may be shown again
  const back = await api("GET", `/api/stone/${encodeURIComponent(r.data.stone_id)}`);
  if (back.ok) {
    if (state.current) state.queue.unshift(state.current);
    state.current = back.data;
    show();
  }
  refreshCounts();
}

function press(key) {
  const c = COLORS.find((x) => x[0] === key), q = CLARITIES.find((x) => x[0] === key);
  const f = FLAGS.find((x) => x[0] === key);
  if (c) state.color = c[1];
  else if (q) state.clarity = q[1];
  else if (f) { state.flags.has(f[1]) ? state.flags.delete(f[1]) : state.flags.add(f[1]); }
  else if (key === "r") { send(null, null, { reject: true }); return; }
  else if (key === "s") { send(null, null, {}); return; }
  else if (key === "u") { undo(); return; }
  else if (key === "f") { $("full").hidden = !$("full").hidden; showFull(); return; }
  else if (key === "n") { $("notes").focus(); return; }
  else return;
  renderChoice();
  if (state.color && state.clarity) send(state.color, state.clarity, {});
}

document.addEventListener("keydown", (ev) => {
  const typing = ev.target === $("notes") || ev.target === $("annotator");
  if (typing) {
    if (ev.key === "Enter" || ev.key === "Escape") { ev.target.blur(); if (ev.target === $("annotator")) nameChanged(); }
    return;
  }
  if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "z") { ev.preventDefault(); press("u"); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  press(ev.key.toLowerCase());
});

function table(el, rows) {
  el.replaceChildren();
  for (const [a, b, cls] of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${a}</td><td class="n ${cls || ""}">${b}</td>`;
    el.appendChild(tr);
  }
}

function fmt(k) { return k === null || k === undefined ? "–" : k.toFixed(2); }

async function refreshCounts() {
  const r = await api("GET", "/api/counts");
  if (r.ok) {
    $("queue-length").textContent = `queue ${r.data.queue} · labelled ${r.data.labelled}`;
    const total = Math.max(1, r.data.labelled - r.data.skipped);
    table($("counts"), [...Object.entries(r.data.by_class).map(([k, v]) =>
      [k.replace("_", " "), `${v} (${(100 * v / total).toFixed(0)} %)`]),
      ["skipped / reject", r.data.skipped], ...Object.entries(r.data.flags).map(([k, v]) => [k, v])]);
  }
  const a = await api("GET", "/api/agreement");
  if (a.ok) {
    const pairs = a.data.pairs;
    $("agreement").innerHTML = (a.data.gold_set.length ? `gold set: ${a.data.gold_set.length} stones<br>` : "") +
      (pairs.length ? pairs.map((p) => `${esc(p.first)} vs ${esc(p.second)}: ${p.stones} stones, κ colour ` +
        `<b class="${p.kappa_color !== null && p.kappa_color < a.data.target_kappa ? "warn" : ""}">${fmt(p.kappa_color)}</b>, ` +
        `κ clarity <b class="${p.kappa_clarity !== null && p.kappa_clarity < a.data.target_kappa ? "warn" : ""}">${fmt(p.kappa_clarity)}</b>` +
        (p.disagreements.length ? `<br>disagree: ${p.disagreements.map((d) => d.stone_id).join(", ")}` : "")).join("<br>")
        : "no stone labelled by two annotators yet");
  }
  const s = await api("GET", "/api/spot");
  if (s.ok) {
    $("spot").innerHTML = !s.data.spot ? "no spot round" :
      `${esc(s.data.spot.annotator)}: ${s.data.relabelled} re-labelled, ${s.data.remaining} to go; disagreement ` +
      `<b class="${s.data.investigate ? "warn" : ""}">${s.data.disagreement === null ? "–" :
        (100 * s.data.disagreement).toFixed(0) + " %"}</b>${s.data.investigate ? " (> 10 %: investigate)" : ""}`;
  }
}

function link(href, text) { return href ? `<a href="${esc(href)}" target="_blank">${text}</a>` : ""; }

async function refreshRetrain() {
  const r = await api("GET", "/api/retrain");
  if (r.status === 503) { $("retrain").textContent = r.data ? r.data.error : "retraining not available"; return; }
  if (!r.ok) { $("retrain").textContent = `retrain status: HTTP ${r.status}`; return; }
  const d = r.data, p = d.progress ?? 0;
  $("retrain-progress").value = p;
  const eta = d.eta_s ? ` · ETA ${Math.round(d.eta_s / 60)} min` : "";
  const epoch = d.epoch !== undefined && d.epoch !== null ? ` · epoch ${esc(d.epoch)}${d.epochs ? "/" + esc(d.epochs) : ""}` : "";
  $("retrain").innerHTML = `${esc(d.state ?? "idle")}${epoch}${eta}` +
    (d.new_labels !== undefined ? ` · ${esc(d.new_labels)} new labels` : "") +
    ` ${link(d.log_url, "§5.5 log entry")} ${link(d.report_url, "report")}` + (d.message ? `<br>${esc(d.message)}` : "");
}

function nameChanged() {
  localStorage.setItem("sorterd-annotator", annotator());
  if (state.loadedFor !== `${annotator()}|${mode()}`) loadQueue();  // Enter and the change it fires: one load
}

function init() {
  table($("shortcuts"), [...COLORS, ...CLARITIES, ...FLAGS.map(([k, n]) => [k, n + " (flag, toggles)"]), ...OTHER]
    .map(([k, n]) => [`<b>${k}</b>`, n]));
  $("annotator").value = localStorage.getItem("sorterd-annotator") || "";
  $("annotator").addEventListener("change", nameChanged);
  $("mode").addEventListener("change", () => { $("mode").blur(); loadQueue(); });
  $("make-gold").addEventListener("click", async () => {
    const r = await api("POST", "/api/gold", {}); say(r.ok ? `gold set: ${r.data.stone_ids.length} stones` : r.data.error);
    refreshCounts();
  });
  $("make-spot").addEventListener("click", async () => {
    const r = await api("POST", "/api/spot", { annotator: annotator() });
    say(r.ok ? `spot round: ${r.data.stone_ids.length} stones; choose mode "spot re-label"` : r.data.error);
    refreshCounts();
  });
  $("retrain-now").addEventListener("click", async () => {
    const r = await api("POST", "/api/retrain", { reason: `requested on the review page by ${annotator() || "someone"}` });
    say(r.ok ? "retraining requested" : (r.data ? r.data.error : `HTTP ${r.status}`));
    refreshRetrain();
  });
  renderChoice();
  loadQueue();
  refreshCounts();
  refreshRetrain();
  setInterval(refreshRetrain, 5000);
  setInterval(refreshCounts, 10000);
}

init();
