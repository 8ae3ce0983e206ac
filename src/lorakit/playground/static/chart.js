// The loss curves of a run as an inline SVG (no image, no library): train loss as a line,
// held-out loss as a dashed line with a marker per evaluation, axes with ticks and labels, and a
// title and description that screen readers read instead of the drawing.
import { fmt, svgEl } from "./dom.js";

const W = 640;
const H = 280;
const PAD = { left: 60, right: 16, top: 28, bottom: 44 };

// About `count` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart).
function ticks(lo, hi, count) {
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const result = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) result.push(+v.toFixed(10));
  return result;
}

function extent(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

function summary(name, points) {
  if (!points.length) return `no ${name} loss recorded`;
  const [first, last] = [points[0], points[points.length - 1]];
  return `${name} loss ${fmt(first[1])} at step ${first[0]} to ${fmt(last[1])} at step ${last[0]} (${points.length} points)`;
}

export function lossChart(curves, id) {
  const train = (curves?.train ?? []).filter((p) => Number.isFinite(p[1]));
  const heldout = (curves?.eval ?? []).filter((p) => Number.isFinite(p[1]));
  const all = [...train, ...heldout];
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "data-testid": "loss-chart",
    "aria-labelledby": `${id}-title ${id}-desc` },
    svgEl("title", { id: `${id}-title` }, "Loss curves"),
    svgEl("desc", { id: `${id}-desc` }, `${summary("train", train)}; ${summary("held-out", heldout)}.`));
  if (!all.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no loss recorded yet"));
    return svg;
  }
  const [x0, x1] = extent(all.map((p) => p[0]));
  const [y0, y1] = extent(all.map((p) => p[1]));
  const x = (v) => PAD.left + ((v - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - ((v - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  const axes = svgEl("g", { class: "axes" },
    svgEl("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom }),
    svgEl("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom }),
    ticks(x0, x1, 6).map((v) => svgEl("text", { x: x(v), y: H - PAD.bottom + 16, "text-anchor": "middle" }, fmt(v, 0))),
    ticks(y0, y1, 5).map((v) => svgEl("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v, 3))),
    svgEl("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" }, "step"),
    svgEl("text", { x: 14, y: (PAD.top + H - PAD.bottom) / 2, "text-anchor": "middle", class: "axis-label",
      transform: `rotate(-90 14 ${(PAD.top + H - PAD.bottom) / 2})` }, "loss"));
  const line = (points) => points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const legend = svgEl("g", { class: "legend" },
    svgEl("line", { x1: PAD.left + 8, y1: 12, x2: PAD.left + 32, y2: 12, class: "train" }),
    svgEl("text", { x: PAD.left + 38, y: 16 }, "train"),
    svgEl("line", { x1: PAD.left + 100, y1: 12, x2: PAD.left + 124, y2: 12, class: "eval" }),
    svgEl("text", { x: PAD.left + 130, y: 16 }, "held-out"));
  svg.append(axes, legend,
    svgEl("polyline", { class: "train", points: line(train), "data-testid": "curve-train",
      "data-count": train.length }),
    svgEl("polyline", { class: "eval", points: line(heldout), "data-testid": "curve-eval",
      "data-count": heldout.length }),
    heldout.map((p) => svgEl("circle", { class: "eval", cx: x(p[0]), cy: y(p[1]), r: 3.5 },
      svgEl("title", {}, `step ${p[0]}: held-out loss ${fmt(p[1])}`))));
  return svg;
}
