"""Headless Chromium for the dashboard's browser test (no tests here), and the README's screenshot.

The browser is Debian's `chromium` + `chromium-driver` (`make browser` installs them where apt-get
is available and we are root), driven by selenium; nothing is downloaded at run time (selenium is
given both binaries, and its driver manager is told to stay offline).

    .venv/bin/python tests/browser_support.py docs/dashboard.png    # the README's screenshot

starts a server (tiny model, 4 CPU devices), sends a mixed burst (256/512/1024 px, few steps),
and saves the dashboard as it looks while the burst runs.
"""
from __future__ import annotations

import os
import shutil
import sys

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
# What a user sees when the browser test skips.
MISSING = ("headless Chromium is not installed: `make browser` installs Debian's chromium and "
           "chromium-driver (root and apt-get needed), or install them yourself")


def find_binaries() -> tuple[str, str] | None:
    """(browser, driver) paths of the system Chromium, or None."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    if browser is None or driver is None:
        return None
    return browser, driver


def headless_chromium(width: int = 1280, height: int = 900):
    """A selenium WebDriver on the system's headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_binaries()
    if found is None:
        raise RuntimeError(MISSING)
    browser, driver = found
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: never download
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_window_size(width, height)
    return chrome


def with_key(url: str, api_key: str) -> str:
    """The URL with the key as HTTP Basic password: the browser answers the dashboard's 401 with
    it, then sends it with every request of the page (its script, style and event stream), as it
    does with a key a user typed into its prompt."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://dashboard:{api_key}@{rest}"


# JavaScript that reads the timeline's blocks out of the page (what the test asserts on).
READ_BLOCKS = """
return [...document.querySelectorAll('#timeline g.block')].map(g => ({
  requests: g.dataset.requests.split(' '), degree: Number(g.dataset.degree),
  devices: g.dataset.devices.split(' '), size: g.dataset.size, rects: g.querySelectorAll('rect.body').length,
  late: g.dataset.late === '1', running: g.dataset.running === '1'}));
"""


def save_page_png(chrome, path: str) -> None:
    """The page as a PNG, cut to its content's height and optimised (the README's stays small)."""
    import io

    from PIL import Image

    height = chrome.execute_script("return Math.ceil(document.body.getBoundingClientRect().height)")
    image = Image.open(io.BytesIO(chrome.get_screenshot_as_png()))
    image = image.crop((0, 0, image.width, min(image.height, height))).convert("RGB")
    image.save(path, format="PNG", optimize=True)


def screenshot_main(path: str) -> int:
    """Serve, burst, screenshot: the README's picture of the dashboard."""
    import asyncio

    return asyncio.run(_screenshot(path))


async def _screenshot(path: str) -> int:
    import asyncio
    import random

    import aiohttp
    from aiohttp import web

    from tetri_engine.server import ServerConfig, create_app, wait_until_ready

    config = ServerConfig(model="tiny", devices=["cpu:0", "cpu:1", "cpu:2", "cpu:3"], max_width=1024,
                          max_height=1024, max_queue=32, admission="best_effort",
                          slo_scale=float(os.environ.get("SCREENSHOT_SLO_SCALE", "2.0")))
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    await wait_until_ready(app)
    rng = random.Random(3)
    sides = [256] * 10 + [512] * 8 + [1024] * 6
    rng.shuffle(sides)

    async def one(session, i: int, side: int) -> None:
        await asyncio.sleep(i * float(os.environ.get("SCREENSHOT_GAP_S", "0.5")))
        body = {"prompt": f"burst {i}", "size": f"{side}x{side}", "num_inference_steps": rng.choice([6, 8, 12]),
                "seed": i}
        async with session.post(f"{base}/v1/images/generations", json=body) as resp:
            await resp.read()

    chrome = await asyncio.to_thread(headless_chromium, 1280, 1040)
    try:
        await asyncio.to_thread(chrome.get, f"{base}/dashboard?window=30")
        async with aiohttp.ClientSession() as session:
            burst = asyncio.gather(*(one(session, i, side) for i, side in enumerate(sides)))
            await asyncio.sleep(float(os.environ.get("SCREENSHOT_AFTER_S", "13")))
            await asyncio.to_thread(save_page_png, chrome, path)
            await burst
    finally:
        await asyncio.to_thread(chrome.quit)
        await runner.cleanup()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(screenshot_main(sys.argv[1] if len(sys.argv) > 1 else "out/dashboard.png"))
