// The page: asks for the API key when the server wants one, then shows the task patterns, the
// slots, the recent requests and a prompt box, refreshing the live parts every few seconds.

import { ApiError, AuthError, getJson, metricSums, postJson, storeKey, storedKey, streamChat } from "./api.js";
import {
  chip as colourChip,
  drawGrid,
  formatNumber,
  h,
  heat,
  ON_DEMAND_COLOUR,
  RETAINED_COLOUR,
  SUPER_COLOUR,
  sparkline,
  swatch,
  taskColours,
} from "./draw.js";
import { renderRoute } from "./route.js";

const REFRESH_MS = 3000;
const HISTORY = 60; // samples kept for the charts (3 minutes)
const COUNTERS = {
  taer_expert_hits_total: "hits",
  taer_expert_misses_total: "misses",
  taer_expert_loads_total: "loads",
  taer_expert_load_bytes_total: "bytes",
  taer_pattern_switches_total: "switches",
  taer_resident_expert_bytes: "residentBytes",
};
const CHARTS = [
  ["hits", "expert hits", "#59a14f"],
  ["misses", "expert misses", "#e15759"],
  ["loads", "experts loaded", "#4e79a7"],
  ["bytes", "bytes loaded", "#76b7b2"],
  ["switches", "pattern switches", "#f28e2b"],
];

const $ = (id) => document.getElementById(id);
const state = { tables: null, colours: {}, recent: [], history: [], timer: null };

// Access ----------------------------------------------------------------------------------------

async function open() {
  setView("loading");
  try {
    const description = await getJson("/v1/taer/patterns");
    state.tables = await getJson("/v1/taer/tcess");
    state.colours = taskColours(state.tables.patterns.map((p) => p.task));
    showDashboard(description);
  } catch (error) {
    if (error instanceof AuthError) return lock(storedKey() ? "That key was refused; try again." : null);
    setStatus(error instanceof ApiError && error.status === 503 ? "the model is loading..." : error.message);
    setTimeout(open, 2000);
  }
}

function showDashboard(description) {
  setView("dashboard");
  $("forget-key").hidden = !storedKey();
  renderSummary(description);
  renderPatterns(state.tables);
  fillTaskChoice(state.tables.patterns.map((p) => p.task));
  refresh();
  clearInterval(state.timer);
  state.timer = setInterval(() => document.hidden || refresh(), REFRESH_MS);
}

/** Back to the key form, with nothing of the server's data left on the page. */
function lock(message) {
  clearInterval(state.timer);
  Object.assign(state, { tables: null, recent: [], history: [], timer: null });
  for (const id of ["summary-list", "patterns", "slots", "counters", "charts", "route-result", "answer", "answer-info", "super-experts", "patterns-note", "heat-legend", "model"]) {
    $(id).replaceChildren();
  }
  $("requests").tBodies[0].replaceChildren();
  $("route-result").hidden = true;
  $("answer-box").hidden = true;
  $("login-message").textContent = message || "This server needs its API key. It is kept in this tab only.";
  setView("login");
}

function setView(view) {
  document.body.dataset.view = view;
  $("login").hidden = view !== "login";
  $("dashboard").hidden = view !== "dashboard";
  setStatus(view === "loading" ? "connecting..." : "");
}

function setStatus(text) {
  $("status").textContent = text;
}

// The live parts ---------------------------------------------------------------------------------

async function refresh() {
  try {
    const [description, recent, counters] = await Promise.all([
      getJson("/v1/taer/patterns"),
      getJson("/v1/taer/requests"),
      metricSums(COUNTERS),
    ]);
    if (!state.tables) return; // locked meanwhile
    state.recent = recent.requests;
    state.history = [...state.history, { time: Date.now(), ...counters }].slice(-HISTORY);
    renderSlots(description);
    renderCounters(counters, description);
    renderCharts();
    renderRequests(recent.requests);
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (error) {
    if (error instanceof AuthError) return lock("The key was refused; enter it again.");
    setStatus(`refresh failed: ${error.message}`);
  }
}

function renderSummary(d) {
  const items = [
    ["mode", d.mode],
    ["budget", `${state.tables.budget} (${state.tables.experts_per_layer} of ${state.tables.num_experts} experts a layer)`],
    ["slots per layer", d.slots_per_layer],
    ["expert dtype", d.expert_dtype],
    ["retrieval", d.retrieval],
    ["tasks", (d.tasks || []).join(", ")],
    ["replicas", d.replicas ? d.replicas.length : null],
  ];
  $("model").textContent = d.model || "";
  $("summary-list").replaceChildren(
    ...items.filter(([, v]) => v !== undefined && v !== null).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
}

function fillTaskChoice(tasks) {
  const select = $("task-select");
  select.replaceChildren(h("option", { value: "" }, "retrieve"), ...tasks.map((t) => h("option", { value: t }, t)));
}

// Task patterns ------------------------------------------------------------------------------------

function renderPatterns(tables) {
  const max = Math.max(1e-9, ...tables.patterns.flatMap((p) => p.tcess.flat()));
  const supers = new Set(tables.super_experts.map((s) => `${s.layer}:${s.expert}`));
  $("patterns-note").textContent =
    `TCESS per MoE layer (rows: decoder layers ${tables.layers.join(", ")}) and expert (columns), ` +
    `darker is higher (scale 0 to ${max.toFixed(3)}, shared by all tasks); outlined: the ` +
    `${tables.experts_per_layer} retained per layer at ${tables.budget}.`;
  $("heat-legend").replaceChildren(
    ...[0, 0.25, 0.5, 0.75, 1].map((v) => swatch(heat(v), (v * max).toFixed(3))),
    swatch(null, "retained", RETAINED_COLOUR),
    swatch(null, "super expert (always retained)", SUPER_COLOUR),
  );
  $("patterns").replaceChildren(...tables.patterns.map((p) => patternFigure(p, tables, max, supers)));
  $("super-experts").textContent = tables.super_experts.length
    ? tables.super_experts
        .map((s) => `layer ${s.layer} expert ${s.expert} (max |output| ${s.max_abs.toPrecision(3)}, ${(s.max_abs / Math.max(s.layer_median, 1e-12)).toFixed(0)}x its layer's median)`)
        .join("; ")
    : "none found at calibration";
}

function patternFigure(pattern, tables, max, supers) {
  const canvas = h("canvas", {
    class: "grid",
    "data-task": pattern.task,
    role: "img",
    "aria-label": `TCESS of ${pattern.task}: ${tables.layers.length} layers by ${tables.num_experts} experts`,
  });
  const retained = pattern.retained.map((ids) => new Set(ids));
  const hit = drawGrid(
    canvas,
    tables.layers.length,
    tables.num_experts,
    (row, e) => heat(pattern.tcess[row][e] / max),
    (row, e) => (supers.has(`${tables.layers[row]}:${e}`) ? "super" : retained[row].has(e) ? "retained" : null),
  );
  tooltipOn(canvas, hit, ({ row, expert }) => {
    const kept = retained[row].has(expert) ? "retained" : "not retained";
    const isSuper = supers.has(`${tables.layers[row]}:${expert}`) ? ", super expert" : "";
    return `${pattern.task}: layer ${tables.layers[row]}, expert ${expert}: TCESS ${pattern.tcess[row][expert].toFixed(4)} (${kept}${isSuper})`;
  });
  canvas.dataset.rendered = "true";
  const title = pattern.task === "general" ? "general (all tasks pooled)" : pattern.task;
  return h(
    "figure",
    { class: "pattern", "data-task": pattern.task },
    h("figcaption", {}, chip(pattern.task), ` ${title}`, h("span", { class: "muted" }, ` ${formatNumber(pattern.num_tokens)} calibration tokens`)),
    canvas,
  );
}

// Slots --------------------------------------------------------------------------------------------

/** Tasks by how recently a request used them, then the rest; `general` last. */
function tasksByRecency() {
  const all = state.tables.patterns.map((p) => p.task);
  const recent = state.recent.map((r) => r.task).filter((t) => t && all.includes(t));
  return [...new Set([...recent, ...all])].sort((a, b) => (a === "general") - (b === "general"));
}

/** The order in which tasks claim resident experts: those whose whole retained set is resident
 * first (the patterns these slots hold), each group by recency. */
function claimOrder(resident) {
  const whole = (task) => {
    const pattern = state.tables.patterns.find((p) => p.task === task);
    return pattern.retained.every((ids, row) => ids.every((e) => resident[row].has(e)));
  };
  const order = tasksByRecency();
  return [...order.filter(whole), ...order.filter((t) => !whole(t))];
}

/** The task a resident expert is there for: the first in `order` that retains it. */
function ownerOf(row, expert, order) {
  for (const task of order) {
    const pattern = state.tables.patterns.find((p) => p.task === task);
    if (pattern.retained[row].includes(expert)) return task;
  }
  return null; // loaded on demand (exact mode) or by the full model
}

function renderSlots(description) {
  const holders = description.replicas
    ? description.replicas.map((r) => ({ label: `replica ${r.replica}`, resident: r.resident_experts || {} }))
    : [{ label: null, resident: description.resident_experts || {} }];
  $("slots").replaceChildren(...holders.map(slotsFigure));
}

function slotsFigure(holder) {
  const { layers, num_experts: numExperts } = state.tables;
  const resident = layers.map((layer) => new Set(holder.resident[String(layer)] || []));
  const order = claimOrder(resident);
  const owners = {};
  const owner = (row, e) => (resident[row].has(e) ? ownerOf(row, e, order) : undefined);
  resident.forEach((ids, row) => ids.forEach((e) => {
    const task = ownerOf(row, e, order) || "on demand";
    owners[task] = (owners[task] || 0) + 1;
  }));
  const canvas = h("canvas", { class: "grid", role: "img", "aria-label": "resident experts per layer" });
  const hit = drawGrid(canvas, layers.length, numExperts, (row, e) => {
    const task = owner(row, e);
    return task === undefined ? null : task === null ? ON_DEMAND_COLOUR : state.colours[task];
  }, () => null);
  tooltipOn(canvas, hit, ({ row, expert }) => {
    const task = owner(row, expert);
    const what = task === undefined ? "not resident" : `resident for ${task || "on-demand loads"}`;
    return `layer ${layers[row]}, expert ${expert}: ${what}`;
  });
  const legend = Object.entries(owners).map(([task, n]) =>
    swatch(task === "on demand" ? ON_DEMAND_COLOUR : state.colours[task], `${task}: ${n}`),
  );
  const figure = h(
    "figure",
    { class: "slots", "data-resident": JSON.stringify(layers.map((l, row) => [...resident[row]].sort((a, b) => a - b))) },
    h("figcaption", {}, holder.label ? `${holder.label}: ` : "", "resident experts per layer (rows) by the task they serve"),
    canvas,
    h("div", { class: "legend slot-owners" }, legend.length ? legend : "nothing resident yet"),
  );
  return figure;
}

function renderCounters(counters, description) {
  const lookups = counters.hits + counters.misses;
  const capacity = description.expert_capacity_bytes;
  const items = [
    ["hits", formatNumber(counters.hits)],
    ["misses", formatNumber(counters.misses)],
    ["hit rate", lookups ? `${((100 * counters.hits) / lookups).toFixed(1)}%` : "-"],
    ["experts loaded", formatNumber(counters.loads)],
    ["bytes loaded", `${formatNumber(counters.bytes)}B`],
    ["pattern switches", formatNumber(counters.switches)],
    ["resident", `${formatNumber(counters.residentBytes)}B${capacity ? ` of ${formatNumber(capacity)}B` : ""}`],
  ];
  $("counters").replaceChildren(...items.map(([k, v]) => h("div", { class: "counter" }, h("span", { class: "value" }, v), h("span", { class: "muted" }, k))));
}

function renderCharts() {
  const samples = state.history;
  const deltas = (key) => samples.slice(1).map((s, i) => Math.max(0, s[key] - samples[i][key]));
  $("charts").replaceChildren(...CHARTS.map(([key, title, colour]) => sparkline(title, deltas(key), colour)));
}

// Requests -----------------------------------------------------------------------------------------

function renderRequests(requests) {
  const fixed = (v, digits) => (v === null || v === undefined ? "-" : v.toFixed(digits));
  $("requests").tBodies[0].replaceChildren(
    ...requests.map((r) =>
      h(
        "tr",
        { "data-task": r.task || "" },
        h("td", {}, new Date(r.finished_at * 1000).toLocaleTimeString()),
        h(
          "td",
          {},
          r.task ? chip(r.task) : null,
          ` ${r.task || "full model"}`,
          r.rerouted ? h("span", { class: "muted" }, ` (re-routed from ${r.retrieved_task})`) : null,
        ),
        h("td", {}, fixed(r.similarity, 3)),
        h("td", {}, fixed(r.confidence, 3)),
        h("td", {}, r.mode || "-"),
        h("td", {}, `${r.experts_loaded} (${r.experts_reused} resident)`),
        h("td", {}, `${r.prompt_tokens} + ${r.completion_tokens}`),
        h("td", {}, `${(r.latency_s * 1000).toFixed(0)} ms`),
        h("td", {}, r.finish_reason || "unfinished"),
      ),
    ),
  );
}

// The prompt box ----------------------------------------------------------------------------------

function asked() {
  const taer = {};
  if ($("task-select").value) taer.task = $("task-select").value;
  if ($("mode-select").value) taer.mode = $("mode-select").value;
  return { messages: [{ role: "user", content: $("prompt").value }], taer };
}

async function route() {
  const box = $("route-result");
  box.hidden = false;
  box.replaceChildren(h("p", { class: "muted" }, "routing..."));
  try {
    const preview = await postJson("/v1/taer/route", asked());
    box.replaceChildren(...renderRoute(preview, state.colours));
    box.dataset.task = preview.task || "";
  } catch (error) {
    if (error instanceof AuthError) return lock("The key was refused; enter it again.");
    box.replaceChildren(h("p", { class: "error" }, error.message));
  }
}

async function run(event) {
  event.preventDefault();
  const { messages, taer } = asked();
  const answer = $("answer");
  const info = $("answer-info");
  $("answer-box").hidden = false;
  answer.replaceChildren();
  delete answer.dataset.finished;
  info.textContent = "waiting for the first token...";
  $("run-button").disabled = true;
  const started = performance.now();
  let routing = null;
  let finish = null;
  let usage = null;
  try {
    await route();
    const body = { messages, taer, max_tokens: Number($("max-tokens").value) || 32 };
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    await streamChat(body, (chunk) => {
      routing = chunk.taer || routing;
      usage = chunk.usage || usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) answer.append(choice.delta.content);
        finish = choice.finish_reason || finish;
      }
      info.textContent = describeRun(routing, finish, usage, performance.now() - started);
    });
    answer.dataset.finished = finish || "";
  } catch (error) {
    if (error instanceof AuthError) return lock("The key was refused; enter it again.");
    info.replaceChildren(h("span", { class: "error" }, error.message));
  } finally {
    $("run-button").disabled = false;
  }
  refresh();
}

function describeRun(routing, finish, usage, elapsedMs) {
  const parts = [];
  if (routing) {
    parts.push(`task ${routing.task || "(full model)"}`, `mode ${routing.mode}`);
    if (routing.rerouted) parts.push(`re-routed by the router check from ${routing.retrieved_task}`);
    if (routing.similarity !== null && routing.similarity !== undefined) parts.push(`similarity ${routing.similarity.toFixed(3)}`);
    if (routing.confidence !== null && routing.confidence !== undefined) parts.push(`confidence ${routing.confidence.toFixed(3)}`);
    parts.push(`${routing.experts_loaded} experts loaded, ${routing.experts_reused} resident`);
    if (routing.replica) parts.push(`replica ${routing.replica}`);
  }
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  parts.push(finish ? `finished (${finish}) in ${(elapsedMs / 1000).toFixed(2)} s` : "streaming...");
  return parts.join(" · ");
}

// Small parts ---------------------------------------------------------------------------------------

const chip = (task) => colourChip(task, state.colours);

function tooltipOn(canvas, hit, text) {
  const tooltip = $("tooltip");
  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const cell = hit(event.clientX - rect.left, event.clientY - rect.top);
    tooltip.hidden = !cell;
    if (!cell) return;
    tooltip.textContent = text(cell);
    tooltip.style.left = `${event.pageX + 12}px`;
    tooltip.style.top = `${event.pageY + 12}px`;
  });
  canvas.addEventListener("mouseleave", () => (tooltip.hidden = true));
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim());
    $("api-key").value = "";
    open();
  });
  $("forget-key").addEventListener("click", () => {
    storeKey("");
    lock(null);
  });
  $("route-button").addEventListener("click", route);
  $("prompt-form").addEventListener("submit", run);
  open();
});
