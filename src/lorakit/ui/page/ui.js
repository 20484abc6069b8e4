// The lorakit page: shared helpers, the runs view (live curves, polled) and start-up; chat and
// compare are in chat.js. Plain JavaScript; every request goes to this server.
"use strict";

const RUNS_EVERY_MS = 3000; // the runs list is refreshed this often
const METRICS_EVERY_MS = 1000; // and the metrics of ticked running runs this often
const state = {
  info: null,
  runs: [], // the list as the server last sent it
  ticked: new Set(), // run paths drawn on the charts
  metrics: new Map(), // run path -> {rows, count}
  open: null, // the run whose details are shown
  chat: [], // the conversation: [{role, content}]
  chatAbort: null,
};
window.lorakitUI = state; // for people (and tests) poking at the page

// ------------------------------------------------------------------ requests and errors

const $ = (id) => document.getElementById(id);

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The server's error message (OpenAI's {"error": {"message"}} shape), made readable.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " — enter the server's API key at the top right";
  return new Error(message);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function showError(error) {
  $("error-text").textContent = String(error.message || error);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// ------------------------------------------------------------------ views

function showView(name) {
  for (const button of document.querySelectorAll("nav button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === name));
  }
  for (const view of ["runs", "chat", "compare"]) $("view-" + view).hidden = view !== name;
  if (name === "runs") { drawCharts(); refreshRuns(); }
  location.hash = name;
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const number = (value, digits = 4) => (typeof value === "number" ? value.toFixed(digits) : "–");
const badge = (status) => element("span", { class: "status status-" + status.replace(" ", "-") }, status);

// ------------------------------------------------------------------ runs

async function refreshRuns() {
  if (!state.info || !state.info.runs) return;
  if ($("view-runs").hidden && state.runs.length) return; // refreshed again once shown
  try {
    state.runs = (await getJSON("/ui/api/runs")).runs;
  } catch (error) {
    showError(error);
    return;
  }
  for (const run of state.runs.flatMap((r) => (r.kind === "sweep" ? r.variants : [r]))) {
    const known = state.metrics.get(run.path);
    if (known && run.status === "running") known.status = "running"; // e.g. a resumed run
  }
  if (state.ticked.size === 0) {
    const first = state.runs.flatMap((r) => (r.kind === "sweep" ? r.variants : [r])).find((r) => r.path);
    if (first) toggleRun(first.path, true);
  }
  renderRunsTable();
}

function renderRunsTable() {
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  const row = (run, kind) => {
    const box = element("input", { type: "checkbox", "aria-label": "draw " + run.name });
    box.checked = state.ticked.has(run.path);
    box.disabled = !run.path;
    box.addEventListener("change", () => toggleRun(run.path, box.checked));
    const name = run.path
      ? element("button", { type: "button", class: "linklike", onclick: () => openRun(run.path) }, run.name)
      : run.name;
    const step = run.total_steps ? `${run.step}/${run.total_steps}` : run.step ?? "";
    const tr = element("tr", { class: kind, "data-path": run.path || "" },
      element("td", {}, box), element("td", {}, name), element("td", {}, badge(run.status)),
      element("td", { class: "num" }, step), element("td", { class: "num" }, number(run.loss)),
      element("td", { class: "num" }, number(run.eval_loss)));
    if (run.path && run.path === state.open) tr.classList.add("selected");
    if (run.error) tr.title = run.error;
    body.append(tr);
  };
  for (const run of state.runs) {
    if (run.kind !== "sweep") { row(run, "run"); continue; }
    const open = element("button", { type: "button", class: "linklike", onclick: () => openRun(run.path) }, run.name);
    body.append(element("tr", { class: "sweep", "data-path": run.path },
      element("td", {}, ""), element("td", {}, "sweep ", open), element("td", {}, badge(run.status)),
      element("td", { colspan: 3, class: "muted" }, `${run.variants.length} variants`)));
    for (const variant of run.variants) row(variant, "variant");
  }
  if (state.runs.length === 0) {
    body.append(element("tr", {}, element("td", { colspan: 6, class: "muted" }, "no runs in this folder yet")));
  }
}

function toggleRun(path, on) {
  if (on) {
    state.ticked.add(path);
    if (!state.open) openRun(path);
    pollMetrics(path);
  } else {
    state.ticked.delete(path);
    drawCharts();
  }
}

async function pollMetrics(path) {
  const known = state.metrics.get(path) || { rows: [], count: 0, status: null };
  try {
    const answer = await getJSON(`/ui/api/metrics?path=${encodeURIComponent(path)}&after=${known.count}`);
    const rows = answer.reset ? answer.rows : known.rows.concat(answer.rows);
    state.metrics.set(path, { rows, count: answer.count, status: answer.status });
  } catch (error) {
    showError(error);
    return;
  }
  drawCharts();
}

// One series per ticked run for each chart.
const CHARTS = [
  { id: "chart-loss", title: "train loss", kind: "train", key: "loss" },
  { id: "chart-eval", title: "eval loss", kind: "eval", key: "eval_loss" },
  { id: "chart-lr", title: "learning rate", kind: "train", key: "lr" },
];
const charts = {};

function drawCharts() {
  if ($("view-runs").hidden) return;
  for (const spec of CHARTS) {
    charts[spec.id] = charts[spec.id] || new LineChart($(spec.id), spec.title);
    const series = [...state.ticked].map((path) => ({
      name: path,
      points: ((state.metrics.get(path) || {}).rows || [])
        .filter((r) => (r.kind || "train") === spec.kind && typeof r[spec.key] === "number")
        .map((r) => [r.step, r[spec.key]]),
    }));
    charts[spec.id].setSeries(series);
  }
}

async function openRun(path) {
  state.open = path;
  renderRunsTable();
  let run;
  try {
    run = await getJSON(`/ui/api/run?path=${encodeURIComponent(path)}`);
  } catch (error) {
    showError(error);
    return;
  }
  const detail = $("run-detail");
  detail.replaceChildren(element("h2", {}, run.kind === "sweep" ? "sweep " : "", run.path, " ", badge(run.status)));
  if (run.error) detail.append(element("p", { class: "message error" }, run.error));
  if (run.kind === "sweep") {
    detail.append(element("p", {}, `axes: ${run.axes.join(", ") || "none"}; tick its variants to compare their curves.`));
    if (run.report) detail.append(element("h3", {}, "report.md"), element("pre", {}, run.report));
    return;
  }
  const numbers = element("dl", { class: "numbers" });
  const add = (label, value) => numbers.append(element("dt", {}, label), element("dd", {}, value));
  add("step", run.total_steps ? `${run.step} of ${run.total_steps}` : run.step);
  add("last train loss", number(run.loss));
  add("last eval loss", number(run.eval_loss));
  add("best eval loss", number(run.best_eval_loss));
  for (const [name, saved] of Object.entries(run.saved || {})) add(`saved ${name}/`, saved.folder);
  detail.append(element("h3", {}, "Numbers"), numbers);
  if (run.samples && run.samples.length) {
    detail.append(element("h3", {}, `Samples (newest ${run.samples.length})`));
    const list = element("div", { id: "samples" });
    for (const sample of run.samples.slice().reverse()) {
      list.append(element("div", { class: "message assistant" },
        element("span", { class: "who" }, `step ${sample.step}: ${sample.prompt}`), sample.completion));
    }
    detail.append(list);
  }
  if (run.config) detail.append(element("h3", {}, "Config"), element("pre", {}, JSON.stringify(run.config, null, 2)));
}

function pollTicked() {
  if ($("view-runs").hidden) return;
  for (const path of state.ticked) {
    const known = state.metrics.get(path);
    if (!known || known.status === "running") pollMetrics(path);
  }
}

// ------------------------------------------------------------------ start

async function start() {
  $("api-key").value = sessionStorage.getItem("lorakit-key") || "";
  try {
    state.info = await getJSON("/ui/api/info");
  } catch (error) {
    showError(error);
    return false;
  }
  clearError();
  $("served").textContent = state.info.model ? `model: ${state.info.model}` : "no model loaded (chat needs --model)";
  $("runs-folder").textContent = state.info.runs ? state.info.runs_folder : "(start with --runs DIR)";
  $("load-adapter").hidden = !state.info.adapter_loading;
  if (state.info.model) await loadModels();
  else {
    const note = () => element("p", { class: "muted" }, "No model is loaded: start lorakit ui with --model BASE (and --adapter NAME=DIR) to chat and compare.");
    $("chat-log").replaceChildren(note());
    $("compare-answers").replaceChildren(note());
  }
  await refreshRuns();
  return true;
}

function setUp() {
  buildParams($("chat-params"));
  buildParams($("compare-params"));
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("error-close").addEventListener("click", clearError);
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("lorakit-key", $("api-key").value.trim());
    start();
  });
  $("chat-send").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-send").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
  $("chat-clear").addEventListener("click", () => { state.chat = []; $("chat-log").replaceChildren(); });
  $("compare-send").addEventListener("submit", sendCompare);
  $("load-button").addEventListener("click", loadAdapter);
  window.addEventListener("resize", drawCharts);
  const viewOfHash = () => {
    const view = location.hash.slice(1);
    return ["runs", "chat", "compare"].includes(view) ? view : "runs";
  };
  window.addEventListener("hashchange", () => showView(viewOfHash()));  // an edited #view
  showView(viewOfHash());
  start();
  setInterval(refreshRuns, RUNS_EVERY_MS);
  setInterval(pollTicked, METRICS_EVERY_MS);
}

setUp();
