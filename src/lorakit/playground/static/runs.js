// Runs: the runs under the server's runs directory as a table; a run's report (key settings,
// data summary, loss curves, scores before and after) and a button that adds its adapter to the
// server (POST /v1/adapters), after which it is a column in Compare and Score.
import { request } from "./api.js";
import { describe, el, fmt, percent } from "./dom.js";
import { lossChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const KEY_SETTINGS = ["model", "data", "method", "r", "lora_alpha", "lora_dropout", "target_modules",
  "learning_rate", "batch_size", "max_steps", "epochs", "train_examples", "eval_examples", "precision", "seed"];

const arrow = (before, after, show) => `${show(before)} → ${show(after)}`;
// `lorakit runs --json` names (score_*); exact_* accepted as well
const exactBefore = (run) => run.score_before ?? run.exact_before;
const exactAfter = (run) => run.score_after ?? run.exact_after;

function adapterState(run) {
  if (run.loaded) return "served";
  return run.has_adapter ? "not loaded" : "none yet";
}

// The key settings of config.yaml (the LoRA ones live under its "lora" key), then all of it.
function settings(config) {
  const flat = { ...(config ?? {}), ...(config?.lora ?? {}) };
  const keys = KEY_SETTINGS.filter((k) => flat[k] !== undefined && flat[k] !== null);
  const show = (v) => (Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : String(v));
  return [el("dl", { class: "settings", "data-testid": "run-config" },
    keys.map((k) => [el("dt", {}, k), el("dd", {}, show(flat[k]))])),
  el("details", {}, el("summary", {}, "All settings (config.yaml)"),
    el("pre", { class: "output" }, JSON.stringify(config ?? {}, null, 2)))];
}

// A score as the run recorded it: metrics.jsonl's score record (exact, then one value per field,
// beside kind, step and phase) or {exact, fields, n}.
function scoreParts(record) {
  if (!record) return null;
  if (record.fields) return { exact: record.exact, fields: record.fields, n: record.n };
  const fields = Object.fromEntries(Object.entries(record).filter(([k, v]) =>
    !["kind", "step", "phase", "exact", "n"].includes(k) && typeof v === "number"));
  return { exact: record.exact, fields, n: record.n };
}

function scores(detail) {
  const before = scoreParts(detail.score_before);
  const after = scoreParts(detail.score_after);
  const cell = (s) => (!s ? "not scored" : s.n ? `${percent(s.exact)} of ${s.n}` : percent(s.exact));
  const fields = [...new Set([...Object.keys(before?.fields ?? {}), ...Object.keys(after?.fields ?? {})])];
  const row = (label, pick) => el("tr", {}, el("th", { scope: "row" }, label),
    el("td", {}, pick(before)), el("td", {}, pick(after)));
  return el("table", { "data-testid": "run-scores" },
    el("caption", { class: "visually-hidden" }, "Held-out scores, untuned and with the adapter"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Score"), el("th", { scope: "col" }, "Before"),
      el("th", { scope: "col" }, "After"))),
    el("tbody", {}, row("exact match", cell),
      fields.map((f) => row(f, (s) => (s && f in s.fields ? percent(s.fields[f]) : "–")))));
}

export function createRuns(page, refresh) {
  let selected = null;

  async function addAdapter(name) {
    const message = $("add-adapter-message");
    $("add-adapter").disabled = true;
    message.textContent = `Adding ${name}…`;
    try {
      await request("/v1/adapters", { method: "POST", body: { name } });
      message.textContent = `Added ${name}: it is now a column in Compare and Score.`;
      await refresh();
    } catch (error) {
      message.textContent = `Could not add ${name}: ${describe(error)}`;
      $("add-adapter").disabled = false;
    }
  }

  function renderDetail(detail) {
    const canAdd = page.info?.can_add_adapters && detail.has_adapter && !detail.loaded;
    const why = detail.loaded ? "Its adapter is served: it is a column in Compare and Score."
      : !detail.has_adapter ? "This run has no adapter yet."
      : !page.info?.can_add_adapters ? "This server does not load adapters over HTTP (start it with --adapter-dir)."
      : "";
    const reportText = detail.report ? el("details", {}, el("summary", {}, "report.md"),
      el("pre", { class: "output", "data-testid": "run-report" }, detail.report)) : null;
    $("run-detail").replaceChildren(
      el("h3", { "data-testid": "run-name" }, detail.name, " ",
        el("span", { class: `status status-${detail.status}`, "data-testid": "run-status" }, detail.status)),
      el("div", { class: "actions" },
        el("button", { id: "add-adapter", type: "button", class: "primary", disabled: !canAdd },
          "Add adapter to server"),
        el("p", { id: "add-adapter-message", role: "status", "data-testid": "add-adapter-message" }, why)),
      el("h4", {}, "Settings"), ...settings(detail.config),
      el("h4", {}, "Data"),
      el("pre", { class: "output", "data-testid": "run-data" }, (detail.data_summary ?? []).join("\n") || "no data summary"),
      el("h4", {}, "Loss"), lossChart(detail.curves, "run-chart"),
      el("h4", {}, "Scores"), el("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": "Scores" },
        scores(detail)),
      reportText);
    $("add-adapter").addEventListener("click", () => addAdapter(detail.name));
    $("run-detail").hidden = false;
  }

  async function select(name) {
    selected = name;
    $("runs-status").textContent = `Reading run ${name}…`;
    try {
      renderDetail(await request(`/v1/playground/runs/${encodeURIComponent(name)}`));
      $("runs-status").textContent = `${page.runs.length} run${page.runs.length === 1 ? "" : "s"}.`;
    } catch (error) {
      $("runs-status").textContent = `Cannot read run ${name}: ${describe(error)}`;
    }
  }

  function renderTable(runs) {
    $("runs-table").tBodies[0].replaceChildren(...runs.map((run) => el("tr", { "data-run": run.name },
      el("th", { scope: "row" }, el("button", { type: "button", class: "link", "data-testid": "run-open",
        "aria-pressed": String(run.name === selected) }, run.name)),
      el("td", { "data-testid": "status" }, run.status),
      el("td", {}, `${run.steps ?? "–"} / ${run.planned_steps ?? "–"}`),
      el("td", {}, arrow(run.heldout_before, run.heldout_after, fmt)),
      el("td", {}, arrow(exactBefore(run), exactAfter(run), percent)),
      el("td", { "data-testid": "adapter" }, adapterState(run)))));
    for (const button of $("runs-table").querySelectorAll("button[data-testid=run-open]")) {
      button.addEventListener("click", () => select(button.textContent));
    }
    $("runs-status").textContent = runs.length ? `${runs.length} run${runs.length === 1 ? "" : "s"}.`
      : `No runs in ${page.info?.runs_dir ?? "the runs directory"}.`;
  }

  $("runs-refresh").addEventListener("click", () => refresh());
  return {
    update(state) {
      renderTable(state.runs);
      if (selected && state.runs.some((r) => r.name === selected) && !$("run-detail").hidden) select(selected);
    },
  };
}
