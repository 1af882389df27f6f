"""The web page in headless Chromium against a real `taer serve` of the tiny model, with its API key
on: nothing is shown without the key; with it every task's heatmap is drawn with its retained set
marked, the prompt box routes a prompt (loading nothing) and streams the same answer the API gives,
and the slots view follows a request of another task. A screenshot is left in test-artifacts/."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from tiny_server import tiny_serve_spec
from web_browser import headless_chromium, wait_for

from benchmarks.servers import ServerProcess

KEY = "page-k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "What is 4 plus 11? Add the two numbers."
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
RETAINED_RGB = (255, 127, 14)  # draw.js's RETAINED_COLOUR

# Per canvas: its size, non-blank pixels, and for every cell whether its outline is the retained colour.
_CANVAS_PROBE = """
const [task, rows, columns, rgb] = arguments;
const canvas = document.querySelector(`canvas.grid[data-task="${task}"]`);
if (!canvas || canvas.dataset.rendered !== "true") return null;
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let inked = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240) inked++;
const w = canvas.width / columns, h = canvas.height / rows;
const outlined = [];
for (let r = 0; r < rows; r++) {
  const row = [];
  for (let e = 0; e < columns; e++) {
    const i = 4 * (Math.floor(r * h + h / 2) * canvas.width + Math.floor(e * w + 1));
    row.push(data[i] === rgb[0] && data[i + 1] === rgb[1] && data[i + 2] === rgb[2]);
  }
  outlined.push(row);
}
return {inked, outlined};
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    spec = tiny_serve_spec("web")
    # Four slots a layer hold one pattern (keep 50% of 8), so another task's request changes them.
    spec = replace(
        spec, command=[*spec.command, "--slots-per-layer", "4"], env={**spec.env, "TAER_API_KEY": KEY}
    )
    with ServerProcess(spec, tmp_path_factory.mktemp("web") / "taer.log") as process:
        yield process.spec.base_url


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        yield driver


def api(server: str, method: str, path: str, **kwargs) -> httpx.Response:
    response = httpx.request(method, f"{server}{path}", headers=AUTH, timeout=60, trust_env=False, **kwargs)
    assert response.status_code == 200, response.text
    return response


def open_page(browser, server: str, key: str | None = KEY) -> None:
    """A fresh page; with ``key``, typed into the key form until the dashboard shows."""
    browser.get(f"{server}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(
        browser, lambda d: d.execute_script("return document.body.dataset.view") == "login", what="login"
    )
    browser.get_log("browser")  # the refused calls before the key are expected; drop them
    if key is not None:
        enter_key(browser, key)
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.view") == "dashboard")


def enter_key(browser, key: str) -> None:
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()


def run_prompt(browser, prompt: str, task: str = "", temperature: str = "0", max_tokens: str = "8") -> str:
    """Types and runs ``prompt`` in the prompt box; the streamed answer once it finished."""
    for field_id, value in (("prompt", prompt), ("temperature", temperature), ("max-tokens", max_tokens)):
        field = browser.find_element(By.ID, field_id)
        field.clear()
        field.send_keys(value)
    Select(browser.find_element(By.ID, "task-select")).select_by_value(task)
    refreshes = int(browser.execute_script("return document.body.dataset.refreshes || '0'"))
    browser.find_element(By.ID, "run-button").click()
    finished = "return document.getElementById('answer').dataset.finished"
    wait_for(browser, lambda d: d.execute_script(finished), timeout_s=60, what="the streamed answer")
    # The page refreshes the slots and requests right after a run.
    count = "return Number(document.body.dataset.refreshes || '0')"
    wait_for(browser, lambda d: d.execute_script(count) > refreshes, what="a refresh after the run")
    return browser.find_element(By.ID, "answer").text


def severe_console_entries(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_without_the_key_nothing_is_shown_and_with_it_the_data_loads(server, browser):
    assert httpx.get(f"{server}/", trust_env=False).status_code == 200  # the page holds no data
    assert httpx.get(f"{server}/v1/taer/tcess", trust_env=False).status_code == 401
    open_page(browser, server, key=None)
    assert not browser.find_element(By.ID, "dashboard").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "canvas, #requests tbody tr, #summary-list dt") == []

    enter_key(browser, "wrong")
    message = browser.find_element(By.ID, "login-message")
    wait_for(browser, lambda d: "refused" in message.text, what="the refusal")
    assert browser.execute_script("return document.body.dataset.view") == "login"
    assert browser.find_elements(By.CSS_SELECTOR, "canvas") == []

    enter_key(browser, KEY)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "canvas.grid[data-task]"), what="heatmaps")
    tasks = [p["task"] for p in api(server, "GET", "/v1/taer/tcess").json()["patterns"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "canvas.grid[data-task]")) == len(tasks)
    assert "keep=0.5" in browser.find_element(By.ID, "summary-list").text

    browser.find_element(By.ID, "forget-key").click()  # and it is all gone again
    assert browser.execute_script("return document.body.dataset.view") == "login"
    assert browser.find_elements(By.CSS_SELECTOR, "canvas") == []


def test_every_tasks_heatmap_is_drawn_with_its_retained_set_marked(server, browser):
    tables = api(server, "GET", "/v1/taer/tcess").json()
    rows, columns = len(tables["layers"]), tables["num_experts"]
    supers = {(tables["layers"].index(s["layer"]), s["expert"]) for s in tables["super_experts"]}
    open_page(browser, server)
    assert [p["task"] for p in tables["patterns"]] == ["arithmetic", "reverse", "general"]
    for pattern in tables["patterns"]:
        probe = wait_for(
            browser,
            lambda d, task=pattern["task"]: d.execute_script(
                _CANVAS_PROBE, task, rows, columns, RETAINED_RGB
            ),
            what=f"the heatmap of {pattern['task']}",
        )
        assert probe["inked"] > 0
        for row, kept in enumerate(pattern["retained"]):
            marked = {e for e in range(columns) if probe["outlined"][row][e]}
            assert marked == set(kept) - {e for r, e in supers if r == row}, (pattern["task"], row)
    assert severe_console_entries(browser) == []


def test_the_prompt_box_routes_without_loading_then_streams_the_apis_answer(server, browser):
    open_page(browser, server)
    loads = _expert_loads(server)
    browser.find_element(By.ID, "prompt").send_keys(QUESTION)
    browser.find_element(By.ID, "route-button").click()
    task = wait_for(browser, lambda d: d.find_elements(By.ID, "route-task"), what="the route")[0].text
    expected = api(server, "POST", "/v1/taer/route", json={"prompt": QUESTION}).json()
    assert task.strip() == expected["task"] == "arithmetic"
    neighbours = browser.find_elements(By.CSS_SELECTOR, "table.neighbours tbody tr")
    assert len(neighbours) == len(expected["neighbours"]) > 0 and "plus" in neighbours[0].text
    shown = browser.find_element(By.ID, "route-experts")
    assert f"{expected['num_experts']} experts" in shown.text
    assert _expert_loads(server) == loads  # a dry run loads nothing

    answer = run_prompt(browser, QUESTION)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
    reply = api(server, "POST", "/v1/chat/completions", json=body).json()
    assert answer == reply["choices"][0]["message"]["content"].strip()
    pieces = browser.execute_script("return document.getElementById('answer').childNodes.length")
    assert pieces == reply["usage"]["completion_tokens"] or pieces > 1  # it streamed in, piece by piece
    info = browser.find_element(By.ID, "answer-info").text
    assert "task arithmetic" in info and "finished" in info and "similarity" in info
    assert severe_console_entries(browser) == []


def test_the_slots_view_follows_a_request_of_another_task(server, browser):
    tables = api(server, "GET", "/v1/taer/tcess").json()
    retained = {p["task"]: p["retained"] for p in tables["patterns"]}
    other = next(t for t in ("reverse", "general") if retained[t] != retained["arithmetic"])
    open_page(browser, server)
    run_prompt(browser, QUESTION, task="arithmetic")
    slots = "return document.querySelector('figure.slots').dataset.resident"
    before = json.loads(browser.execute_script(slots))
    assert before == [sorted(kept) for kept in retained["arithmetic"]]

    run_prompt(browser, "Reverse the letters of the word apple.", task=other)
    after = wait_for(
        browser, lambda d: json.loads(d.execute_script(slots)) != before and d.execute_script(slots)
    )
    assert json.loads(after) == [sorted(kept) for kept in retained[other]]
    assert other in browser.find_element(By.CSS_SELECTOR, ".slot-owners").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#requests tbody tr")
    assert [r.get_attribute("data-task") for r in rows[:2]] == [other, "arithmetic"]
    assert severe_console_entries(browser) == []
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "web-page.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot of the web page: {screenshot}")


def _expert_loads(server: str) -> float:
    metrics = api(server, "GET", "/metrics").text
    return sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("taer_expert_loads_total")
    )
