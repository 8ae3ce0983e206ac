// Score: run held-out examples through the chosen columns on the server (POST
// /v1/playground/score), then show each column's exact match and per-field scores, and the
// examples where the columns disagree, each prediction diffed against the reference.
import { request } from "./api.js";
import { checkedModels, describe, el, percent, renderModelChoices, renderSources } from "./dom.js";
import { renderDiff } from "./diff.js";

const $ = (id) => document.getElementById(id);

function fieldScores(fields) {
  const entries = Object.entries(fields ?? {});
  if (!entries.length) return "–";
  return entries.map(([name, value]) => `${name} ${value <= 1 ? percent(value) : value}`).join(" · ");
}

function summary(result) {
  const rows = Object.entries(result.models).map(([model, s]) => el("tr", { "data-model": model },
    el("th", { scope: "row" }, model),
    el("td", { "data-testid": "correct" }, `${s.correct} / ${result.n}`),
    el("td", { "data-testid": "exact" }, percent(s.exact)),
    el("td", { "data-testid": "fields" }, fieldScores(s.fields))));
  const title = `Scores: ${result.scorer ?? "exact match"} on ${result.n} held-out examples`;
  return el("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": "Scores table" },
    el("table", { "data-testid": "score-table" },
      el("caption", { class: "visually-hidden" }, title),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Column"), el("th", { scope: "col" }, "Correct"),
        el("th", { scope: "col" }, "Exact match"), el("th", { scope: "col" }, "Per field"))),
      el("tbody", {}, rows)));
}

function disagreement(example, models) {
  const answers = models.map((model) => {
    const text = example.predictions[model] ?? "";
    const ok = example.correct?.[model];
    return [el("dt", {}, model, " ", el("span", { class: ok ? "ok" : "bad" }, ok ? "✓ correct" : "✗ wrong"),
      text.trim() ? null : " (empty answer)"),
      el("dd", {}, el("pre", { class: "output", "data-testid": "prediction", "data-model": model },
        renderDiff(example.reference ?? "", text)))];
  });
  return el("article", { class: "example-card", "data-testid": "disagreement", "data-index": example.index },
    el("h4", {}, `Example #${example.index}`),
    el("p", { class: "prompt" }, el("span", { class: "label" }, "Prompt: "), example.prompt),
    el("p", { class: "label" }, "Reference:"),
    el("pre", { class: "output reference", "data-testid": "reference" }, example.reference ?? ""),
    el("dl", { class: "answers" }, answers));
}

function render(result) {
  const models = Object.keys(result.models);
  const disagreeing = result.examples.filter((e) => e.disagree);
  $("score-results").replaceChildren(
    el("section", { class: "panel", "aria-labelledby": "score-summary-title" },
      el("h3", { id: "score-summary-title" }, "Scores"),
      el("p", { "data-testid": "score-scorer" }, `${result.scorer ?? "exact match"}, ${result.n} held-out examples`),
      summary(result)),
    el("section", { class: "panel", "aria-labelledby": "score-disagree-title" },
      el("h3", { id: "score-disagree-title" }, "Where the columns disagree"),
      el("p", { "data-testid": "disagree-count" }, `${disagreeing.length} of ${result.n} examples. `,
        el("del", {}, "struck out"), ": in the reference, missing from the answer; ",
        el("ins", {}, "underlined"), ": in the answer, not in the reference."),
      disagreeing.map((e) => disagreement(e, models))));
}

export function createScore(page) {
  async function score(event) {
    event.preventDefault();
    const models = checkedModels($("score-models"));
    if (!models.length) {
      $("score-status").textContent = "Choose at least one column.";
      return;
    }
    const limit = Math.max(1, Math.round(Number($("score-limit").value || 20)));
    const body = { run: $("score-source").value || null, models, limit,
      max_tokens: Math.max(1, Math.round(Number($("score-max-tokens").value || 64))) };
    $("score-send").disabled = true;
    $("score-results").setAttribute("aria-busy", "true");
    $("score-status").textContent = `Scoring ${limit} examples with ${models.length} column${models.length === 1 ? "" : "s"}…`;
    try {
      const result = await request("/v1/playground/score", { method: "POST", body });
      render(result);
      $("score-status").textContent = `Scored ${result.n} examples.`;
    } catch (error) {
      $("score-status").textContent = `Scoring failed: ${describe(error)}`;
    } finally {
      $("score-send").disabled = false;
      $("score-results").removeAttribute("aria-busy");
    }
  }

  $("score-form").addEventListener("submit", score);
  let rendered = false;
  return {
    update(state) {
      const checked = rendered ? new Set(checkedModels($("score-models")))
        : new Set(state.models.map((m) => m.id));
      renderModelChoices($("score-models"), "score", state.models, checked);
      renderSources($("score-source"), state.runs, "built-in held-out examples (task-api)");
      rendered = true;
    },
  };
}
