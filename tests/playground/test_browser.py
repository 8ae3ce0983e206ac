"""The playground page end to end in a real browser: headless Chromium (the system's package),
driven by Selenium through the system's chromedriver, against `lorakit.playground` serving the
tiny model, two adapters and a directory of two tiny training runs.

Compare: two adapters chosen as columns stream their answers, which equal the API's greedy
answers for the same request. Score: the counts shown are the /v1/playground/score answer's, and
exactly the examples where the columns disagree are listed. Runs: a run's status, its loss curve
with one point per train record of metrics.jsonl, and "Add adapter" making it a column. The API
key: the page asks for it and works once it is given. Layout: at 390x844 and 1440x900, no two
visible elements overlap and nothing scrolls sideways; screenshots of every view at both sizes
go to ``$LORAKIT_TEST_ARTIFACTS/playground`` (default: test-artifacts/playground/ in the repo).

Without chromium or chromedriver the tests skip, saying so, unless ``LORAKIT_REQUIRE_BROWSER=1``
(set by .ci/run, which installs them), where they fail instead.
"""

import base64
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

try:  # a test dependency; without it (or without the browser) the tests skip, see browser_or_skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None

from lorakit import LoraConfig, get_peft_model
from lorakit.models import load_model
from lorakit.playground import load_playground
from .conftest import train_runs

ROOT = Path(__file__).resolve().parents[2]
KEY = "browser-s3cret"
SIZES = {"narrow": (390, 844), "wide": (1440, 900)}
TIMEOUT = 60  # seconds a DOM condition may take to hold (a cold tiny model on a busy 2-core machine)


def browser_or_skip():
    """(chromium, chromedriver) paths; a skip with the reason when missing, a failure when the
    environment says the browser must be there."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if webdriver is None:
        missing.append("the selenium package")
    if missing:
        reason = (f"browser tests need {' and '.join(missing)} (Debian: apt-get install chromium chromium-driver; "
                  "pip install -e '.[test]')")
        if os.environ.get("LORAKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; LORAKIT_REQUIRE_BROWSER=1 says they must be installed")
        pytest.skip(reason)
    return chromium, driver


def artifacts_dir() -> Path:
    base = os.environ.get("LORAKIT_TEST_ARTIFACTS")
    path = Path(base) / "playground" if base else ROOT / "test-artifacts" / "playground"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- fixtures: runs, the server, the browser
@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """runs/ with "tasks" (task-api, 4 steps) and "ok" (`conftest.ok_records`, 20 steps)."""
    root = tmp_path_factory.mktemp("browser")
    train_runs(root, tiny_model_dir)
    return root / "runs"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Adapters "a" and "b" with random A and B (``init_lora_weights=False``: each answers otherwise)."""
    root = tmp_path_factory.mktemp("browser-adapters")
    made = []
    for name, seed in (("a", 1), ("b", 2)):
        base, _ = load_model(tiny_model_dir)
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(root / name)
        made.append((name, root / name))
    return made


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs, adapters):
    """Adapters a, b and the "ok" run's; the "tasks" run's can be added from the page."""
    with load_playground(str(tiny_model_dir), [*adapters, ("ok", runs / "ok" / "adapter")], runs_dir=runs,
                         adapter_dir=runs, port=0, max_batch=8, max_tokens=32, precision="fp32").start() as server:
        yield server


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,900"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit chromedriver: Selenium Manager never looks for (or downloads) one
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, server):
    """The page freshly loaded at the wide size, with its models listed."""
    driver.set_window_size(*SIZES["wide"])
    open_page(driver, server.url)
    yield driver
    problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, f"errors in the browser's console: {problems}"


# -- helpers
def open_page(driver, url, view="compare", wait_models=True):
    driver.get(f"{url}/#{view}")
    if wait_models:
        wait(driver, lambda d: d.find_elements("css selector", "#compare-models input[data-model]"))


def wait(driver, condition, timeout=TIMEOUT):
    return WebDriverWait(driver, timeout).until(condition)


def css(driver, selector):
    return driver.find_elements("css selector", selector)


def text_of(driver, element):
    """The element's exact text (Selenium's .text collapses white space)."""
    return driver.execute_script("return arguments[0].textContent", element)


def choose(driver, fieldset, models):
    """Check exactly ``models`` among a fieldset's model checkboxes."""
    for box in css(driver, f"#{fieldset} input[data-model]"):
        if box.is_selected() != (box.get_attribute("data-model") in models):
            box.click()


def fill(driver, element_id, value):
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def post(server, path, body, key=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=60) as response:
        return json.load(response)


def compare(driver, models, system, prompt, max_tokens):
    """Send a greedy prompt to ``models`` and wait until every column has finished."""
    driver.find_element("id", "tab-compare").click()
    choose(driver, "compare-models", models)
    fill(driver, "system", system)
    fill(driver, "prompt", prompt)
    fill(driver, "temperature", 0)
    fill(driver, "max-tokens", max_tokens)
    driver.find_element("id", "send").click()
    wait(driver, lambda d: len(css(d, "[data-testid=column]")) == len(models)
         and all(c.get_attribute("data-state") in ("done", "error") for c in css(d, "[data-testid=column]")))
    return {c.get_attribute("data-model"): c for c in css(driver, "[data-testid=column]")}


def score(driver, source, models, limit):
    driver.find_element("id", "tab-score").click()
    wait(driver, lambda d: d.find_element("id", "score-source").is_displayed())
    Select(driver.find_element("id", "score-source")).select_by_value(source)
    choose(driver, "score-models", models)
    fill(driver, "score-limit", limit)
    fill(driver, "score-max-tokens", 8)
    driver.find_element("id", "score-send").click()
    wait(driver, lambda d: css(d, "[data-testid=score-table]") and d.find_element("id", "score-send").is_enabled())


def open_run(driver, name):
    driver.find_element("id", "tab-runs").click()
    button = wait(driver, lambda d: next((b for b in css(d, "[data-testid=run-open]") if b.text == name), None))
    button.click()
    wait(driver, lambda d: css(d, "[data-testid=run-name]")
         and d.find_element("css selector", "[data-testid=run-name]").text.startswith(name)
         and css(d, "[data-testid=curve-train]"))


# -- Compare
def test_two_adapters_stream_the_apis_greedy_answers(page, server):
    system, prompt = "Answer briefly.", "Name three colours of the rainbow."
    columns = compare(page, ["a", "b"], system, prompt, max_tokens=16)
    assert list(columns) == ["a", "b"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    answers = {}
    for model, column in columns.items():
        assert column.get_attribute("data-state") == "done", text_of(page, column)
        output = column.find_element("css selector", "[data-testid=output]")
        expected = post(server, "/v1/chat/completions", {"model": model, "messages": messages, "temperature": 0,
                                                         "max_tokens": 16})
        answers[model] = text_of(page, output)
        assert answers[model] == expected["choices"][0]["message"]["content"]
        # streamed: the text came in several pieces (each piece is appended as its own text node)
        assert page.execute_script("return arguments[0].childNodes.length", output) > 1
        assert output.get_attribute("aria-live") == "polite"
        assert float(column.find_element("css selector", "[data-testid=tps]").text) > 0
        assert int(column.find_element("css selector", "[data-testid=completion-tokens]").text) == \
            expected["usage"]["completion_tokens"]
    assert answers["a"] != answers["b"]  # two different adapters, two different columns
    assert page.find_element("id", "send").is_enabled() and not page.find_element("id", "stop").is_enabled()


def test_a_held_out_example_fills_the_prompt_and_shows_its_reference(page, server):
    Select(page.find_element("id", "example-source")).select_by_value("ok")
    wait(page, lambda d: len(css(d, "#example-pick option")) > 1)
    Select(page.find_element("id", "example-pick")).select_by_index(1)
    first = get(server, "/v1/playground/examples?run=ok&limit=20")["examples"][0]
    assert page.find_element("id", "prompt").get_attribute("value") == first["messages"][-1]["content"]
    assert page.find_element("css selector", "[data-testid=reference]").text == first["reference"]


# -- Score
def test_score_mode_shows_the_counts_and_the_disagreements(page, server, tiny_model_dir):
    base = tiny_model_dir.name
    score(page, "ok", [base, "ok"], limit=12)
    expected = post(server, "/v1/playground/score", {"run": "ok", "models": [base, "ok"], "limit": 12,
                                                     "max_tokens": 8})
    n = expected["n"]
    for model, result in expected["models"].items():
        row = page.find_element("css selector", f"[data-testid=score-table] tr[data-model='{model}']")
        assert row.find_element("css selector", "[data-testid=correct]").text == f"{result['correct']} / {n}"
        assert row.find_element("css selector", "[data-testid=exact]").text == f"{result['exact'] * 100:.1f}%"
    disagree = [e for e in expected["examples"] if e["disagree"]]
    assert disagree and expected["models"]["ok"]["correct"] > expected["models"][base]["correct"]
    cards = css(page, "[data-testid=disagreement]")
    assert [int(c.get_attribute("data-index")) for c in cards] == [e["index"] for e in disagree]
    for card, example in zip(cards, disagree):
        assert card.find_element("css selector", "[data-testid=reference]").text == example["reference"]
        for prediction in card.find_elements("css selector", "[data-testid=prediction]"):
            model = prediction.get_attribute("data-model")
            # the diff shows the prediction's own text once the reference's missing words are left out
            shown = page.execute_script(
                "const c = arguments[0].cloneNode(true);"
                "c.querySelectorAll('del, .visually-hidden').forEach(e => e.remove()); return c.textContent",
                prediction)
            assert shown == example["predictions"][model]
            if example["predictions"][model] != example["reference"]:
                assert prediction.find_elements("css selector", "ins, del")


# -- Runs
def test_runs_view_shows_a_runs_report_and_adds_its_adapter(page, server, runs):
    open_run(page, "tasks")
    listed = {r["name"]: r for r in get(server, "/v1/playground/runs")["runs"]}
    row = page.find_element("css selector", "#runs-table tr[data-run='tasks']")
    assert row.find_element("css selector", "[data-testid=status]").text == listed["tasks"]["status"] == "finished"
    assert page.find_element("css selector", "[data-testid=run-status]").text == "finished"
    records = [json.loads(line) for line in (runs / "tasks" / "metrics.jsonl").read_text().splitlines()]
    train_points = sum(r["kind"] == "train" for r in records)
    curve = page.find_element("css selector", "[data-testid=curve-train]")
    assert len(curve.get_attribute("points").split()) == train_points == 4
    evals = sum(r["kind"] == "eval" for r in records)
    assert len(page.find_element("css selector", "[data-testid=curve-eval]").get_attribute("points").split()) == evals
    config = yaml.safe_load((runs / "tasks" / "config.yaml").read_text())
    shown = page.find_elements("css selector", "[data-testid=run-config] dt, [data-testid=run-config] dd")
    settings = dict(zip([e.text for e in shown[::2]], [e.text for e in shown[1::2]]))
    assert settings["r"] == str(config["lora"]["r"]) and settings["max_steps"] == str(config["max_steps"])
    assert settings["target_modules"] == ", ".join(config["lora"]["target_modules"])
    chart = page.find_element("css selector", "[data-testid=loss-chart]")
    assert {"step", "loss"} <= set(chart.find_element("css selector", ".axes").text.split())
    assert "tasks" not in server.model_ids()
    add = page.find_element("id", "add-adapter")
    assert add.is_enabled()
    add.click()
    wait(page, lambda d: css(d, "#compare-models input[data-model='tasks']"))
    assert "tasks" in server.model_ids()
    wait(page, lambda d: d.find_element("css selector", "#runs-table tr[data-run='tasks'] [data-testid=adapter]")
         .text == "served")
    assert not page.find_element("id", "add-adapter").is_enabled()


# -- the API key
def test_with_an_api_key_the_page_asks_for_it_and_then_works(driver, tiny_model_dir, runs):
    with load_playground(str(tiny_model_dir), runs_dir=runs, port=0, max_tokens=8, api_key=KEY).start() as server:
        open_page(driver, server.url, wait_models=False)
        form = wait(driver, lambda d: d.find_element("id", "auth") if d.find_element("id", "auth").is_displayed()
                    else None)
        assert driver.switch_to.active_element == driver.find_element("id", "api-key")
        fill(driver, "api-key", "wrong")
        form.find_element("id", "api-key-save").click()
        wait(driver, lambda d: "refused" in d.find_element("id", "auth-message").text)
        fill(driver, "api-key", KEY)
        form.find_element("id", "api-key-save").click()
        wait(driver, lambda d: css(d, "#compare-models input[data-model]"))
        assert not driver.find_element("id", "auth").is_displayed()
        columns = compare(driver, [tiny_model_dir.name], "", "Hello", max_tokens=4)
        assert columns[tiny_model_dir.name].get_attribute("data-state") == "done"
        problems = [e["message"] for e in driver.get_log("browser")
                    if e["level"] == "SEVERE" and " 401 " not in e["message"]]
        assert not problems, problems


# -- layout
OVERLAPS = """
const selector = "h1,h2,h3,h4,p,pre,label,button,input,select,textarea,table,svg,legend,dt,dd,summary,"
  + "[role=tab],[data-testid=column]";
const visible = [...document.querySelectorAll(selector)].filter((e) => {
  if (e.closest("[hidden], .visually-hidden")) return false;
  if (e.closest("details:not([open])") && !e.closest("summary")) return false;  // folded away
  const style = getComputedStyle(e);
  return style.visibility !== "hidden" && style.display !== "none" && e.getClientRects().length > 0;
});
// the part of each box that shows: inside a sideways-scrolling region, only what the region shows
const boxes = visible.map((e) => {
  let r = e.getBoundingClientRect();
  let [left, top, right, bottom] = [r.left, r.top, r.right, r.bottom];
  const region = e.parentElement && e.parentElement.closest(".scroll");
  if (region) {
    const c = region.getBoundingClientRect();
    [left, right] = [Math.max(left, c.left), Math.min(right, c.right)];
  }
  return { e, left, top, right, bottom };
}).filter((b) => b.right - b.left >= 1 && b.bottom - b.top >= 1);
const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "")
  + (e.dataset.testid ? `[${e.dataset.testid}]` : "") + ` "${(e.textContent || "").trim().slice(0, 30)}"`;
const found = [];
for (let i = 0; i < boxes.length; i++) {
  for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (a.e.contains(b.e) || b.e.contains(a.e)) continue;
    const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (w > 1 && h > 1) found.push(`${name(a.e)} overlaps ${name(b.e)} (${w.toFixed(0)}x${h.toFixed(0)} px)`);
  }
}
return { overlaps: found, checked: boxes.length,
         scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth };
"""


def screenshot(driver, path):
    """The whole page, beyond the window's height (Chrome DevTools' capture)."""
    width, height = driver.execute_script("return [window.innerWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def test_no_overlap_and_no_sideways_scroll_at_a_narrow_and_a_wide_window(page, server, tiny_model_dir):
    # every view with its content: two streamed columns, a score with disagreements, a run's report
    compare(page, [tiny_model_dir.name, "a"], "", "Write a long line: " + "word " * 30, max_tokens=32)
    score(page, "ok", [tiny_model_dir.name, "ok"], limit=6)
    open_run(page, "ok")
    for summary in css(page, "#run-detail summary"):  # the folded parts too: all settings, report.md
        summary.click()
    out = artifacts_dir()
    for size, (width, height) in SIZES.items():
        page.set_window_size(width, height)
        for view in ("compare", "score", "runs"):
            page.find_element("id", f"tab-{view}").click()
            wait(page, lambda d: d.find_element("id", f"view-{view}").is_displayed())
            screenshot(page, out / f"{view}-{size}.png")
            layout = page.execute_script(OVERLAPS)
            assert layout["checked"] > 10, (view, size, layout)
            assert not layout["overlaps"], (view, size, layout["overlaps"])
            assert layout["scrollWidth"] <= layout["clientWidth"], (view, size, layout)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{view}-{size}.png" for view in ("compare", "score", "runs") for size in SIZES)
