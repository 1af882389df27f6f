// A dry-run route (POST /v1/taer/route) as the prompt box shows it: the task and the vote behind
// it, the stored examples that voted, and the experts the request would need per layer.

import { chip, h } from "./draw.js";

const fixed = (value, digits = 3) => (value === null || value === undefined ? "-" : value.toFixed(digits));

const HOW = {
  semantic: "retrieved",
  forced: "forced by taer.task",
  full: "the full model (no pattern)",
  none: "no index: the general pattern",
};

export function renderRoute(preview, colours) {
  const nodes = [
    h(
      "p",
      { class: "route-headline" },
      preview.task ? chip(preview.task, colours) : null,
      h("strong", { id: "route-task" }, ` ${preview.task || "full model"}`),
      ` (${HOW[preview.retrieval] || preview.retrieval}), mode ${preview.mode}`,
      preview.similarity !== null ? `, similarity ${fixed(preview.similarity)}` : "",
      preview.confidence !== null ? `, confidence ${fixed(preview.confidence)}` : "",
      preview.replica ? `, on replica ${preview.replica}` : "",
    ),
  ];
  if (preview.is_fallback && preview.candidate) {
    nodes.push(h("p", { class: "muted" }, `The vote's winner, ${preview.candidate}, was not trusted (similarity or confidence below the thresholds): general serves.`));
  } else if (preview.runner_up) {
    nodes.push(h("p", { class: "muted" }, `Runner-up: ${preview.runner_up}.`));
  }
  nodes.push(expertsSummary(preview));
  if (preview.neighbours.length) nodes.push(neighboursTable(preview.neighbours, colours));
  if (preview.experts) nodes.push(expertsTable(preview));
  return nodes;
}

function expertsSummary(preview) {
  if (!preview.experts) return h("p", { id: "route-experts" }, "Every expert may be used; misses are loaded on demand.");
  const layers = Object.keys(preview.experts).length;
  const resident = preview.num_experts - preview.num_to_load;
  const verb = preview.mode === "exact" ? "would prefetch" : "would use";
  return h(
    "p",
    { id: "route-experts", "data-to-load": preview.num_to_load },
    `It ${verb} ${preview.num_experts} experts over ${layers} layers: ${preview.num_to_load} to load, ${resident} already resident.`,
  );
}

function neighboursTable(neighbours, colours) {
  return h(
    "table",
    { class: "neighbours" },
    h("caption", {}, "Nearest stored examples"),
    h("thead", {}, h("tr", {}, h("th", {}, "task"), h("th", {}, "similarity"), h("th", {}, "cosine"), h("th", {}, "text"))),
    h(
      "tbody",
      {},
      neighbours.map((n) =>
        h("tr", {}, h("td", {}, chip(n.task, colours), ` ${n.task}`), h("td", {}, fixed(n.similarity)), h("td", {}, fixed(n.cosine)), h("td", {}, n.text)),
      ),
    ),
  );
}

function expertsTable(preview) {
  return h(
    "table",
    { class: "experts" },
    h("caption", {}, "Experts per layer (to load now in bold)"),
    h("thead", {}, h("tr", {}, h("th", {}, "layer"), h("th", {}, "experts"))),
    h(
      "tbody",
      {},
      Object.entries(preview.experts).map(([layer, ids]) => {
        const missing = new Set(preview.experts_to_load[layer] || []);
        const cells = ids.flatMap((e) => [missing.has(e) ? h("strong", {}, String(e)) : String(e), " "]);
        return h("tr", {}, h("td", {}, layer), h("td", {}, cells));
      }),
    ),
  );
}
