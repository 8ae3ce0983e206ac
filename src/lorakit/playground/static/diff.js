// A word-level diff of a prediction against the reference, for the Score view: the longest
// common subsequence of their tokens (words, runs of spaces, single punctuation marks, so that
// JSON answers diff field by field), shown as <del> (in the reference, missing from the
// prediction) and <ins> (in the prediction, not in the reference), each with a text alternative.
import { el } from "./dom.js";

const TOKENS = /\w+|\s+|[^\w\s]/gu;
const MAX_CELLS = 4_000_000;  // beyond this table size, show the whole texts as replaced

function tokens(text) {
  return text.match(TOKENS) ?? [];
}

// [op, text] pairs: op is "=", "-" (reference only) or "+" (prediction only).
export function diffWords(reference, prediction) {
  const a = tokens(reference);
  const b = tokens(prediction);
  if (a.length * b.length > MAX_CELLS) return [["-", reference], ["+", prediction]];
  // lcs[i][j]: the LCS length of a[i:] and b[j:], one flat array of (n+1)(m+1) cells
  const w = b.length + 1;
  const lcs = new Uint32Array((a.length + 1) * w);
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      lcs[i * w + j] = a[i] === b[j] ? lcs[(i + 1) * w + j + 1] + 1
        : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
    }
  }
  const ops = [];
  const push = (op, text) => {
    const last = ops[ops.length - 1];
    if (last && last[0] === op) last[1] += text;
    else ops.push([op, text]);
  };
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) { push("=", a[i]); i++; j++; }
    else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) push("-", a[i++]);
    else push("+", b[j++]);
  }
  while (i < a.length) push("-", a[i++]);
  while (j < b.length) push("+", b[j++]);
  return ops;
}

// The prediction with its differences from the reference marked up (screen readers are told
// "missing" and "extra", which <del> and <ins> alone do not announce everywhere).
export function renderDiff(reference, prediction) {
  const hidden = (text) => el("span", { class: "visually-hidden" }, text);
  return diffWords(reference, prediction).map(([op, text]) => {
    if (op === "=") return text;
    return op === "-" ? el("del", {}, hidden("[missing: "), text, hidden("]"))
      : el("ins", {}, hidden("[extra: "), text, hidden("]"));
  });
}
