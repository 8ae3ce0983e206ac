// The playground page: three views (Compare, Score, Runs) as keyboard-accessible tabs, the API
// key field, and the server's model list and runs, which every view shares.
import { auth, request } from "./api.js";
import { describe } from "./dom.js";
import { createCompare } from "./compare.js";
import { createScore } from "./score.js";
import { createRuns } from "./runs.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["compare", "score", "runs"];

// What every view reads: set by refresh(), passed to the views' update().
const page = { info: null, models: [], runs: [] };
const views = {};

// -- tabs: arrow keys, Home and End move between them (WAI-ARIA tabs pattern); the URL's hash
// names the view, so a reload or a link opens it
function showView(name, focus = false) {
  if (!VIEWS.includes(name)) name = "compare";
  for (const view of VIEWS) {
    const tab = $(`tab-${view}`);
    const selected = view === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`view-${view}`).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  views[name]?.shown?.();
}

function bindTabs() {
  VIEWS.forEach((view, i) => {
    const tab = $(`tab-${view}`);
    tab.addEventListener("click", () => showView(view));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: VIEWS.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      showView(VIEWS[(moves[event.key] + VIEWS.length) % VIEWS.length], true);
    });
  });
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
}

// -- the API key: any 401 shows the field; a key entered is kept for the tab and everything reloads
function bindAuth() {
  auth.onNeeded = (message) => {
    const form = $("auth");
    const wasHidden = form.hidden;
    form.hidden = false;
    $("auth-message").textContent = auth.key()
      ? `The server refused the key: ${message}` : "This server wants an API key.";
    if (wasHidden) $("api-key").focus();
  };
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    auth.setKey(key);
    $("api-key").value = "";
    $("auth").hidden = true;
    refresh();
  });
}

// -- the shared state: models (base first) and runs
async function refresh() {
  try {
    const info = await request("/v1/playground/info");
    page.info = info;
    page.models = info.models.map((id) => ({ id, label: id === info.base ? `${id} (base model)` : id }));
    $("server-info").textContent = `${info.models.length} model${info.models.length === 1 ? "" : "s"}: `
      + `base ${info.base}, ${info.models.length - 1} adapter${info.models.length === 2 ? "" : "s"}`
      + (info.auth ? " · API key on" : "");
  } catch (error) {
    $("server-info").textContent = `Cannot read the server's models: ${describe(error)}`;
    return;
  }
  try {
    page.runs = (await request("/v1/playground/runs")).runs;
  } catch (error) {
    page.runs = [];
    $("runs-status").textContent = `Cannot list the runs: ${describe(error)}`;
  }
  for (const view of Object.values(views)) view.update(page);
}

function start() {
  views.compare = createCompare(page);
  views.score = createScore(page);
  views.runs = createRuns(page, refresh);
  bindTabs();
  bindAuth();
  showView(location.hash.slice(1));
  refresh();
}

start();
