"""Make docs/img/dashboard.png: a kvtier server in this process, some traffic (two models, three tenants, one with
a quota, a memory tier small enough to evict to disk), the dashboard in Debian's headless chromium (through its
chromedriver, as tests/server/test_dashboard.py drives it), a lookup in its lookup box, a screenshot.

Usage: .venv/bin/python scripts/dashboard_screenshot.py [OUTPUT.png]
Needs selenium (the test extra) and Pillow (matplotlib's: the bench extra), which shrinks the PNG to 256 colours.
"""

from __future__ import annotations

import io
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from kvtier import KVLayout
from kvtier.client import KVTierClient
from kvtier.config import load_config
from kvtier.server.main import Server

CHUNK = 256
MODELS = {"SmolLM2-135M-Instruct": KVLayout(4, 2, 64), "Qwen2.5-0.5B-Instruct": KVLayout(3, 2, 64)}
TENANTS = ["", "team-a", "team-b"]
POLL_MS = 250
TRAFFIC_SEC = 35.0  # the charts' whole width (150 polls), showing a few waves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(disk: Path) -> Server:
    config = load_config(
        env={},
        overrides={"port": free_port(), "http_port": free_port(), "chunk_size": CHUNK, "local_disk": str(disk),
                   "max_local_cpu_size": 0.01, "max_local_disk_size": 0.05},
    )  # fmt: skip
    server = Server(config)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assert server.ready.wait(10)
    return server


def traffic(port: int, until: float) -> dict[tuple[str, str], list[int]]:
    """Requests in waves: prompts sharing system prompts per model and tenant, some new, some repeated; the system
    prompts."""
    rng = random.Random(7)
    clients = {m: KVTierClient(f"127.0.0.1:{port}", model=m, layout=lay, chunk_size=CHUNK) for m, lay in MODELS.items()}
    system = {(m, t): [rng.randrange(50_000) for _ in range(4 * CHUNK)] for m in MODELS for t in TENANTS}
    seen: list[tuple[str, str, list[int]]] = []
    while time.monotonic() < until:
        model, tenant = rng.choice(list(MODELS)), rng.choice(TENANTS)
        if seen and rng.random() < 0.6:
            model, tenant, prompt = rng.choice(seen)
        else:
            prompt = system[model, tenant] + [rng.randrange(50_000) for _ in range(rng.randrange(CHUNK, 6 * CHUNK))]
            seen.append((model, tenant, prompt))
        client = clients[model]
        client.lookup(prompt, cache_salt=tenant)
        if rng.random() < 0.7:  # a router's lookups are not all followed by a retrieve here
            client.retrieve(prompt, cache_salt=tenant)
        kv = np.ones(MODELS[model].chunk_shape(len(prompt)), np.float16)
        client.store(prompt, kv, cache_salt=tenant)
        time.sleep(rng.choice([0.05, 0.1, 0.3]) if int(time.monotonic() / 4) % 2 else 0.5)  # busy and quiet spells
    for client in clients.values():
        client.close()
    return system


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def lookup(driver: webdriver.Chrome, model: str, tokens: list[int]) -> None:
    """Ask the lookup box about ``tokens`` of ``model``'s engine; wait for the answer."""
    for option in driver.find_elements("css selector", "#lookup-engine option"):
        if option.text.startswith(f"{model} ("):
            option.click()
    driver.find_element("css selector", "#lookup-prompt").send_keys(json.dumps(tokens))
    driver.find_element("css selector", "#lookup-submit").click()
    for _ in range(100):
        if driver.find_elements("css selector", "#lookup-result li"):
            return
        time.sleep(0.05)
    raise RuntimeError("the lookup box did not answer")


def main(output: Path) -> None:
    with tempfile.TemporaryDirectory() as disk:
        server = start_server(Path(disk))
        config = server.service.config
        server.service.admin.set_quota("team-b", 2 << 20)
        driver = browser()
        try:
            driver.get(f"http://127.0.0.1:{config.http_port}/?interval={POLL_MS}")
            system = traffic(config.port, time.monotonic() + TRAFFIC_SEC)
            model = next(iter(MODELS))
            lookup(driver, model, [*system[model, ""], *range(CHUNK + 40)])  # a cached prefix, then new tokens
            script = "scrollTo(0, 0); return document.documentElement.scrollHeight + outerHeight - innerHeight"
            driver.set_window_size(1280, max(1000, int(driver.execute_script(script))))  # the whole page
            time.sleep(2 * POLL_MS / 1000)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            server.stop()
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(output, optimize=True)  # a third of the size
    print(f"{output}: {output.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "img" / "dashboard.png"))
