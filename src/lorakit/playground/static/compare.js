// Compare: one streaming chat request per chosen column, all sent at once (the server runs them
// in one batch), each column filled as its text arrives, then its tokens/s and time to first token.
import { request, streamChat } from "./api.js";
import { checkedModels, describe, el, fmt, renderModelChoices, renderSources } from "./dom.js";

const $ = (id) => document.getElementById(id);

// The sampling settings of the form, as OpenAI's request fields (seed only when given).
function sampling() {
  const body = {
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top-p").value || 1),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens").value || 64))),
  };
  if ($("seed").value.trim() !== "") body.seed = Math.round(Number($("seed").value));
  return body;
}

export function createCompare(page) {
  // The example picked, if any: its turns before the last user turn, and its reference answer.
  let example = null;
  let examples = [];
  let controller = null;

  function messages() {
    const turns = [];
    if ($("system").value.trim()) turns.push({ role: "system", content: $("system").value });
    if (example) turns.push(...example.context);
    turns.push({ role: "user", content: $("prompt").value });
    return turns;
  }

  function column(model) {
    const output = el("pre", { class: "output", "data-testid": "output", "aria-live": "polite" });
    const stats = el("p", { class: "stats", "data-testid": "stats" }, "waiting…");
    const node = el("article", { class: "column", "data-testid": "column", "data-model": model,
      "data-state": "waiting", "aria-busy": "true" }, el("h3", {}, model), output, stats);
    return { model, node, output, stats };
  }

  // Tokens/s counts the tokens after the first over the time from the first piece to the last
  // (the first token's wait is the time to first token); with a single piece, over the whole time.
  function showStats(col, t) {
    const n = t.usage?.completion_tokens;
    const ttft = t.first === null ? null : (t.first - t.sent) / 1000;
    const decode = t.last !== null && t.last > t.first && n > 1 ? (n - 1) / ((t.last - t.first) / 1000)
      : n ? n / ((t.end - t.sent) / 1000) : null;
    col.stats.replaceChildren(
      el("span", { "data-testid": "tps" }, fmt(decode, 1)), " tokens/s · ",
      el("span", { "data-testid": "ttft" }, fmt(ttft, 2)), " s to first token · ",
      el("span", { "data-testid": "completion-tokens" }, n ?? "?"), " tokens");
    if (example && example.reference !== null) {
      const same = col.output.textContent.trim() === example.reference.trim();
      col.stats.append(" · ", el("strong", { "data-testid": "matches" },
        same ? "matches the reference" : "differs from the reference"));
    }
  }

  async function run(col, body, signal) {
    const t = { sent: performance.now(), first: null, last: null, end: null, usage: null };
    col.node.dataset.state = "streaming";
    col.stats.textContent = "streaming…";
    try {
      await streamChat({ ...body, model: col.model }, {
        signal,
        onText(piece) {
          t.last = performance.now();
          if (t.first === null) t.first = t.last;
          col.output.append(piece);
        },
        onUsage(usage) { t.usage = usage; },
      });
      t.end = performance.now();
      col.node.dataset.state = "done";
      showStats(col, t);
    } catch (error) {
      const stopped = error.name === "AbortError";
      col.node.dataset.state = stopped ? "stopped" : "error";
      col.stats.replaceChildren(el("span", { class: stopped ? "" : "error", "data-testid": "error" },
        stopped ? "stopped" : `error: ${describe(error)}`));
    } finally {
      col.node.removeAttribute("aria-busy");
    }
  }

  async function send(event) {
    event.preventDefault();
    const models = checkedModels($("compare-models"));
    if (!models.length || !$("prompt").value.trim()) {
      $("compare-status").textContent = !models.length ? "Choose at least one column." : "Type a prompt first.";
      return;
    }
    const body = { ...sampling(), messages: messages() };
    const columns = models.map(column);
    $("columns").replaceChildren(...columns.map((c) => c.node));
    controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    $("compare-status").textContent = `Sending to ${models.length} column${models.length === 1 ? "" : "s"}…`;
    // every request starts before any is awaited: the server batches those that arrive together
    await Promise.all(columns.map((c) => run(c, body, controller.signal)));
    $("send").disabled = false;
    $("stop").disabled = true;
    $("compare-status").textContent = controller.signal.aborted ? "Stopped." : "Done.";
    controller = null;
  }

  async function loadExamples() {
    const source = $("example-source").value;
    const query = new URLSearchParams({ limit: "20" });
    if (source) query.set("run", source);
    pickExample(null);
    $("example-pick").replaceChildren(el("option", { value: "" }, "None: type a prompt"));
    try {
      examples = (await request(`/v1/playground/examples?${query}`)).examples;
    } catch (error) {
      examples = [];
      $("compare-status").textContent = `Cannot read the examples: ${describe(error)}`;
      return;
    }
    for (const ex of examples) {
      const last = [...ex.messages].reverse().find((m) => m.role === "user");
      const text = last ? last.content : "";
      $("example-pick").append(el("option", { value: String(ex.index) },
        `#${ex.index}: ${text.length > 60 ? `${text.slice(0, 57)}…` : text}`));
    }
  }

  // Fill the prompt (and system prompt) from an example, and show its reference.
  function pickExample(index) {
    const ex = examples.find((e) => String(e.index) === index);
    const ref = $("example-reference");
    if (!ex) {
      example = null;
      ref.hidden = true;
      return;
    }
    const turns = ex.messages;
    const lastUser = turns.map((m) => m.role).lastIndexOf("user");
    $("system").value = turns.filter((m) => m.role === "system").map((m) => m.content).join("\n");
    $("prompt").value = lastUser >= 0 ? turns[lastUser].content : "";
    example = { context: turns.filter((m, i) => m.role !== "system" && i !== lastUser),
      reference: ex.reference ?? null };
    ref.replaceChildren("Reference answer: ", el("code", { "data-testid": "reference" }, ex.reference ?? "none"));
    ref.hidden = false;
  }

  $("compare-form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller?.abort());
  $("example-source").addEventListener("change", loadExamples);
  $("example-pick").addEventListener("change", () => pickExample($("example-pick").value));

  let rendered = false;
  return {
    update(state) {
      // first time: the base model and the first adapter; later: keep the choice
      const checked = rendered ? new Set(checkedModels($("compare-models")))
        : new Set(state.models.slice(0, 2).map((m) => m.id));
      renderModelChoices($("compare-models"), "compare", state.models, checked);
      renderSources($("example-source"), state.runs, "built-in held-out examples (task-api)");
      if (!rendered) loadExamples();
      rendered = true;
    },
  };
}
