// Drawing: colours, the layers x experts grids (canvas) and the counters' sparklines (SVG).

const TASK_COLOURS = [
  "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#17becf",
];
export const GENERAL_COLOUR = "#8c8c8c";
export const ON_DEMAND_COLOUR = "#d0d0d0";
export const RETAINED_COLOUR = "#ff7f0e";
export const SUPER_COLOUR = "#d62728";
const HEAT_STOPS = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
const SVG = "http://www.w3.org/2000/svg";

/** A colour per task, in the order the server lists them (`general` grey). */
export function taskColours(tasks) {
  const colours = {};
  tasks.filter((t) => t !== "general").forEach((t, i) => (colours[t] = TASK_COLOURS[i % TASK_COLOURS.length]));
  colours.general = GENERAL_COLOUR;
  return colours;
}

/** value in [0, 1] -> a blue of that depth. */
export function heat(value) {
  const x = Math.min(Math.max(value, 0), 1) * (HEAT_STOPS.length - 1);
  const i = Math.min(Math.floor(x), HEAT_STOPS.length - 2);
  const f = x - i;
  const rgb = HEAT_STOPS[i].map((c, k) => Math.round(c + f * (HEAT_STOPS[i + 1][k] - c)));
  return `rgb(${rgb.join(",")})`;
}

/** Cell size for a rows x columns grid that fits about 640 x 320 px (DeepSeek-V3, 58 x 256: 2 px cells). */
export function cellSize(rows, columns) {
  const width = Math.max(2, Math.min(24, Math.floor(640 / columns)));
  const height = Math.max(3, Math.min(24, Math.floor(320 / rows), width));
  return { width, height };
}

/**
 * A layers x experts grid on `canvas`: `fill(row, expert)` gives a cell's colour (or null: empty),
 * `mark(row, expert)` a marker ("retained", "super" or null). Returns the hit test
 * (x, y) -> {row, expert} | null used for tooltips.
 */
export function drawGrid(canvas, rows, columns, fill, mark) {
  const { width, height } = cellSize(rows, columns);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = columns * width * ratio;
  canvas.height = rows * height * ratio;
  canvas.style.width = `${columns * width}px`;
  canvas.style.height = `${rows * height}px`;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  for (let row = 0; row < rows; row++) {
    for (let expert = 0; expert < columns; expert++) {
      const x = expert * width;
      const y = row * height;
      g.fillStyle = fill(row, expert) || "#ffffff";
      g.fillRect(x, y, width, height);
      const marker = mark(row, expert);
      if (marker === "retained") outline(g, x, y, width, height, RETAINED_COLOUR);
      else if (marker === "super") outline(g, x, y, width, height, SUPER_COLOUR);
    }
  }
  return (px, py) => {
    const expert = Math.floor(px / width);
    const row = Math.floor(py / height);
    return row >= 0 && row < rows && expert >= 0 && expert < columns ? { row, expert } : null;
  };
}

function outline(g, x, y, width, height, colour) {
  g.strokeStyle = colour;
  if (width >= 6 && height >= 6) {
    g.lineWidth = 2;
    g.strokeRect(x + 1, y + 1, width - 2, height - 2);
  } else {
    g.fillStyle = colour; // too small to outline: a bar along the cell's bottom
    g.fillRect(x, y + height - 1, width, 1);
  }
}

/** A small line chart of `values` (one number per sample) in an SVG element, with a title. */
export function sparkline(title, values, colour) {
  const width = 220;
  const height = 48;
  const max = Math.max(1, ...values);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 6)).toFixed(1)}`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", colour);
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = `${title} (max ${formatNumber(max)} per interval)`;
  figure.append(caption, svg);
  return figure;
}

export function formatNumber(value) {
  if (value >= 1e9) return `${(value / 1e9).toFixed(1)} G`;
  if (value >= 1e6) return `${(value / 1e6).toFixed(1)} M`;
  if (value >= 1e4) return `${(value / 1e3).toFixed(1)} k`;
  return `${Math.round(value * 100) / 100}`;
}

/** A small square in the task's colour. */
export function chip(task, colours) {
  const element = h("span", { class: "chip", title: task });
  element.style.background = colours[task] || ON_DEMAND_COLOUR;
  return element;
}

/** A legend entry: a square filled (or outlined) in a colour, and its label. */
export function swatch(fill, label, border) {
  const box = h("span", { class: "swatch" });
  if (fill) box.style.background = fill;
  if (border) box.style.borderColor = border;
  return h("span", { class: "legend-item" }, box, label);
}

/** An element with attributes and children (text children become text nodes, never HTML). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) element.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) element.append(child instanceof Node ? child : String(child));
  }
  return element;
}
