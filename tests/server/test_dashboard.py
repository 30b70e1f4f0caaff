"""The dashboard at the admin port's ``/``: served self-contained (plain HTTP), and working in a real headless
browser: Debian's ``chromium`` driven through Debian's ``chromedriver`` by selenium (never selenium's own driver
manager, which would download one). It loads without script errors, follows the traffic as it polls, explains a
prompt in the lookup box, and shows untrusted strings as text. Browser tests skip when chromium is not installed
(``scripts/test.sh`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from conftest import CHUNK, LAYOUT, InProcessServer, http_get
from kvtier.client import KVTierClient

TOKEN = "dashboard-token"
POLL_MS = 200  # the page's ?interval=, so that a test sees a few polls in a second
HOSTILE_MODEL = '<img src=x onerror="window.kvtierInjected=1">'
CHART_BOTTOM = 152.0  # y of a zero value in the page's charts (CHART.height - CHART.bottom)


def ones(num_tokens: int) -> np.ndarray:
    return np.ones(LAYOUT.chunk_shape(num_tokens), np.float16)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """``predicate()`` once it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A server with a bearer token: the page itself needs none, its lookup box sends it to /explain."""
    server = InProcessServer(tmp_path_factory.mktemp("dashboard") / "disk", server_auth_token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read by console_errors
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)  # a driver path: no driver manager
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: Any, server: InProcessServer) -> Any:
    """The dashboard, loaded and polling; the console log emptied."""
    browser.get(f"http://127.0.0.1:{server.http_port}/?interval={POLL_MS}")
    wait_for(lambda: attribute(browser, "#connection", "class") == "live", "the first poll")
    browser.get_log("browser")
    return browser


def css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def texts(driver: Any, selector: str) -> list[str]:
    """The text of every element ``selector`` matches, read at once (the page redraws between two reads)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)"
    return list(driver.execute_script(script, selector))


def rows(driver: Any, selector: str) -> list[list[str]]:
    """The cells of each row of table ``selector``'s body."""
    script = """return [...document.querySelectorAll(arguments[0] + ' tbody tr')]
        .map((r) => [...r.cells].map((c) => c.textContent))"""
    return list(driver.execute_script(script, selector))


def attribute(driver: Any, selector: str, name: str) -> str | None:
    script = "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])"
    return driver.execute_script(script, selector, name)  # type: ignore[no-any-return]


def console_errors(driver: Any, *, network: bool = True) -> list[dict[str, Any]]:
    """The console's SEVERE entries since the last call (``network=False``: not failed requests)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and (network or e["source"] != "network")]


def tier_hits(driver: Any, tier: str) -> float:
    return float(attribute(driver, f'#tier-legend [data-series="{tier}"]', "data-total") or 0)


def peak_y(driver: Any, series: str) -> float:
    """The highest point (smallest y) of a chart line; CHART_BOTTOM when it has none above zero."""
    path = attribute(driver, f'#tier-chart path[data-series="{series}"]', "d") or ""
    return min((float(y) for y in re.findall(r",([\d.]+)", path)), default=CHART_BOTTOM)


def explain_in_the_page(driver: Any, tokens: list[int], token: str = TOKEN, salt: str = "") -> list[str]:
    """Ask the lookup box about ``tokens`` (test-model's engine, tenant ``salt``); the result's lines."""
    engine = css(driver, "#lookup-engine")
    wait_for(lambda: any(o.text.startswith("test-model (") for o in engine.find_elements("tag name", "option")),
             "test-model in the engine list")  # fmt: skip
    next(o for o in engine.find_elements("tag name", "option") if o.text.startswith("test-model (")).click()
    for selector, value in (("#lookup-prompt", json.dumps(tokens)), ("#lookup-token", token), ("#lookup-salt", salt)):
        css(driver, selector).clear()
        if value:
            css(driver, selector).send_keys(value)
    driver.execute_script("document.getElementById('lookup-result').replaceChildren()")
    css(driver, "#lookup-submit").click()
    return wait_for(lambda: texts(driver, "#lookup-result li, #lookup-result .error"), "the lookup's answer")


# -- without a browser --------------------------------------------------------------------------------------
def test_the_page_is_self_contained_and_needs_no_token(server: InProcessServer) -> None:
    status, body = http_get(server.http_port, "/")  # no token, though the server has one
    assert status == 200
    html = body.decode()
    assert html.startswith("<!doctype html>") and "<script>" in html
    assert "http://" not in html and "https://" not in html  # no asset, font or script from anywhere
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']?data:)""", html)  # nothing loaded, but the empty favicon


def test_the_page_allows_only_its_own_script_and_style() -> None:
    """The CSP hashes match the page's inline blocks (the browser tests would fail otherwise) and allow no other
    source: an injected inline handler or script would not run."""
    from kvtier.server import dashboard

    policy = dict(part.split(" ", 1) for part in dashboard.headers()["Content-Security-Policy"].split("; "))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"].startswith("'sha256-") and "unsafe" not in policy["script-src"]
    assert policy["style-src"].startswith("'sha256-") and "unsafe" not in policy["style-src"]


def test_dashboard_data_is_one_poll_of_everything_the_page_shows(server: InProcessServer) -> None:
    with server.client(auth_token=TOKEN) as client:
        client.store(list(range(2000, 2000 + 2 * CHUNK)), ones(2 * CHUNK))
        client.retrieve(list(range(2000, 2000 + 2 * CHUNK)))
    status, body = http_get(server.http_port, "/dashboard/data?limit=1")
    assert status == 200
    data = json.loads(body)
    assert data["requests"][0]["op"] == "retrieve" and len(data["requests"]) == 1
    hits = {s["labels"]["tier"]: s["value"] for s in data["metrics"]["kvtier_retrieve_hit_tokens_total"]}
    assert hits["memory"] >= 2 * CHUNK
    engine = next(e for e in data["status"]["engines"] if e["model"] == "test-model")
    assert engine["layout_meta"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16",
                                     "kv_size": 2}  # fmt: skip
    assert "config" not in data["status"]  # the page shows no configuration
    assert http_get(server.http_port, "/dashboard/data?limit=0")[0] == 400


# -- in the browser -----------------------------------------------------------------------------------------
def test_the_page_loads_without_errors(page: Any) -> None:
    assert page.title == "kvtier dashboard"
    wait_for(lambda: texts(page, "#tiers .label")[:2] == ["memory", "disk"], "the tiers panel")
    assert css(page, "#chunk-size").text == str(CHUNK)
    time.sleep(3 * POLL_MS / 1000)  # a few more polls
    assert console_errors(page) == []


def test_the_charts_and_tables_follow_the_traffic(page: Any, server: InProcessServer) -> None:
    before = tier_hits(page, "memory")
    prompt = list(range(3000, 3000 + 4 * CHUNK))
    with server.client(auth_token=TOKEN) as client:
        client.store(prompt, ones(len(prompt)))
        client.retrieve(prompt)
        client.retrieve(list(range(9000, 9000 + CHUNK)))  # never stored
    wait_for(lambda: tier_hits(page, "memory") >= before + len(prompt), "memory's hit tokens to grow")
    wait_for(lambda: peak_y(page, "memory") < CHART_BOTTOM, "a point above zero on memory's line")
    retrieves = wait_for(lambda: [r for r in rows(page, "#requests") if r[1:3] == ["retrieve", "test-model"]],
                         "the retrieves in the recent requests")  # fmt: skip
    assert [f"memory {len(prompt)}", "-"] in [[r[6], r[8]] for r in retrieves]  # hits by tier, misses by reason
    assert ["-", f"never_stored {CHUNK}"] in [[r[6], r[8]] for r in retrieves]
    wait_for(lambda: "never_stored" in texts(page, "#misses .label"), "never_stored in the misses")
    assert rows(page, "#evictions") == [["no evictions"]] and "_default" in texts(page, "#tenants .label")
    assert console_errors(page) == []


def test_the_lookup_box_explains_a_prompt(page: Any, server: InProcessServer) -> None:
    prompt = list(range(5000, 5000 + 4 * CHUNK))
    with server.client(auth_token=TOKEN) as client:
        client.store(prompt, ones(len(prompt)))
    lines = explain_in_the_page(page, [*prompt, 1, 2, 3])
    assert lines[0] == f"tokens 0-{4 * CHUNK}: memory"
    assert lines[1].startswith(f"tokens {4 * CHUNK}-{4 * CHUNK + 3}: partial_chunk \u2014 shorter than a chunk")
    assert "64 of 67 tokens cached" in texts(page, "#lookup-result .summary")[0]
    assert explain_in_the_page(page, list(range(7000, 7000 + 2 * CHUNK))) == [f"tokens 0-{2 * CHUNK}: never_stored"]
    with server.client(auth_token=TOKEN) as client:
        client.store(list(range(8000, 8000 + CHUNK)), ones(CHUNK), cache_salt="tenant-a")
    assert explain_in_the_page(page, list(range(8000, 8000 + CHUNK)), salt="tenant-a") == [f"tokens 0-{CHUNK}: memory"]
    assert explain_in_the_page(page, list(range(8000, 8000 + CHUNK))) == [
        f"tokens 0-{CHUNK}: other_namespace \u2014 cached under another tenant's cache_salt"
    ]
    stored = page.execute_script(
        "return [sessionStorage.getItem('lookup-token'), sessionStorage.getItem('lookup-salt')]"
    )
    assert stored == [TOKEN, ""]
    assert TOKEN not in page.current_url and "tenant-a" not in page.current_url
    assert console_errors(page) == []
    assert explain_in_the_page(page, prompt, token="wrong") == ["401: missing or wrong bearer token"]
    assert console_errors(page, network=False) == []  # the 401 itself is logged as a failed request


def test_untrusted_strings_are_shown_as_text(page: Any, server: InProcessServer) -> None:
    url = f"127.0.0.1:{server.port}"
    with KVTierClient(url, model=HOSTILE_MODEL, layout=LAYOUT, chunk_size=CHUNK, auth_token=TOKEN) as client:
        client.store(list(range(CHUNK)), ones(CHUNK))
    wait_for(lambda: HOSTILE_MODEL in texts(page, "#requests td.model"), "the model name in the requests table")
    assert any(HOSTILE_MODEL in option for option in texts(page, "#lookup-engine option"))
    (line,) = explain_in_the_page(page, list(range(CHUNK)))  # test-model's view: cached under the hostile name
    assert line.startswith(f"tokens 0-{CHUNK}: other_namespace") and HOSTILE_MODEL in line
    assert page.find_elements("css selector", "img") == []
    assert page.execute_script("return window.kvtierInjected") is None
    assert console_errors(page) == []
