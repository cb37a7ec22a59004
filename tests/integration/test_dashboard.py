"""The live dashboard end to end: a real worker fed real footage, the page in a real Chromium.

The browser is Debian's ``chromium`` driven by Playwright (no browser download). A machine
without it fails these tests with what to install; the dashboard is not a GPU feature, so
there is nothing to skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from stream_worker.dashboard.live import RateTracker, Reading
from stream_worker.dashboard.server import start_dashboard
from stream_worker.sinks.counts import CountsReader
from tests.conftest import REPO, Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, running_worker, worker_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "tests" / "artifacts"
NORTH, SOUTH = "dash-cam-north", "dash-cam-south"


async def counts_in_redis(client: aioredis.Redis, prefix: str, source: str, window: str) -> Counter[str]:
    """Label totals and frames of one source, summed over its windows, as Redis holds them."""
    counts = CountsReader(client, key_prefix=prefix)
    total: Counter[str] = Counter()
    for w in await counts.read(source, window):
        total["_frames"] += w.frames
        total.update(w.labels)
    return total


async def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll ``await check()`` until it is true, or fail saying ``what`` never happened."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:.0f} s")
        await asyncio.sleep(0.25)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium through Playwright; failing (never skipping) when it is missing."""
    try:
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the dashboard test needs Playwright: pip install playwright", pytrace=False)
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    async with async_playwright() as pw:
        try:
            instance = await pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=60_000
            )
        except PlaywrightError as exc:
            pytest.fail(f"Chromium ({CHROMIUM}) did not start under Playwright: {exc}", pytrace=False)
        try:
            yield instance
        finally:
            await instance.close()


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET from a thread (the server runs on this test's event loop)."""

    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(get)


async def test_page_shows_the_fed_counts_thumbnails_and_health_of_each_source_live(
    services: Services,
    make_topic: TopicFactory,
    redis_client: aioredis.Redis,
    key_prefix: str,
    browser: Any,
) -> None:
    topic = await make_topic("frames", partitions=2)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, windows="1m,15m")
    # Every 5th frame of the clip: a mix of labels (bicycles, vehicles, unknown), not one scene.
    images = street_jpegs(250)[::5]
    first = [(NORTH, image) for image in images[:24]] + [(SOUTH, image) for image in images[24:40]]
    later = [(NORTH, image) for image in images[40:50]]
    async with running_worker(settings):
        # Captured just now, so the page's end-to-end latency is a real one.
        now_ms = int(time.time() * 1000)
        await produce_frames(services.bootstrap, topic, first, start_ms=now_ms - 3000, step_ms=100)
        await produce_frames(services.bootstrap, topic, [(NORTH, b"this is not a JPEG")], start_ms=now_ms)

        async def first_round_counted() -> bool:
            for source, n in ((NORTH, 24), (SOUTH, 16)):
                if (await counts_in_redis(redis_client, key_prefix, source, "1m"))["_frames"] != n:
                    return False
            dead = await redis_client.hget(f"{key_prefix}:live:stats:{NORTH}", "dead")
            thumbs = [await redis_client.exists(f"{key_prefix}:live:thumb:{s}") for s in (NORTH, SOUTH)]
            return dead == b"1" and all(thumbs)

        await wait_for(first_round_counted, "the worker did not count every fed frame and store thumbnails")

        server = await start_dashboard(settings, host="127.0.0.1", port=0)
        page = await browser.new_page(viewport={"width": 1440, "height": 1000})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        async def shows(source: str, frames: int, dead: int) -> None:
            """The page shows exactly what Redis holds for ``source`` (``frames`` counted)."""
            await page.wait_for_function(
                "want => document.body.dataset.counts === want", arg=f"{source}|1m|{frames}", timeout=30_000
            )
            expected = await counts_in_redis(redis_client, key_prefix, source, "1m")
            assert expected["_frames"] == frames
            shown = await page.eval_on_selector_all(
                "#totals tbody tr",
                "rows => rows.map(r => [r.dataset.label, Number(r.querySelector('.num').textContent)])",
            )
            assert dict(shown) == {k: v for k, v in expected.items() if k != "_frames"}, source
            assert await page.text_content("#totals-frames") == str(frames)
            # The chart stacks leaf labels, plus what a group counted beyond its children (frames
            # only sure of "vehicle"): each window's stack is its frames, every frame once.
            legend = await page.eval_on_selector_all(
                "#chart .u-legend .u-series:not(:first-child) .u-label", "ls => ls.map(l => l.textContent)"
            )
            groups = set(
                await page.eval_on_selector_all("#totals tr.group", "rs => rs.map(r => r.dataset.label)")
            )
            leaves = {k for k in expected if k not in groups and k != "_frames"}
            assert leaves <= set(legend)
            assert set(legend) - leaves <= {f"{g} (type unclear)" for g in groups}
            windows = await CountsReader(redis_client, key_prefix=key_prefix).read(source, "1m")
            assert await page.get_attribute("#chart", "data-stack-tops") == ",".join(
                str(w.frames) for w in windows
            )
            assert await page.locator("#chart canvas").count() == 1
            await page.wait_for_function(
                "() => { const i = document.getElementById('latest-thumb');"
                " return !i.hidden && i.complete && i.naturalWidth > 0; }",
                timeout=20_000,
            )
            await page.wait_for_function(
                "want => document.getElementById('kpi-frames').textContent === want", arg=str(frames)
            )
            assert await page.text_content("#kpi-dead") == str(dead)
            assert await page.text_content("#kpi-latency") not in (None, "–"), "no end-to-end latency shown"

        try:
            await page.goto(f"{server.url}#source={NORTH}&window=1m", wait_until="load")
            await shows(NORTH, 24, dead=1)
            # Live: more frames arrive while the page is open; it catches up without a reload and
            # shows their rate.
            await produce_frames(
                services.bootstrap, topic, later, start_ms=int(time.time() * 1000), step_ms=100
            )
            await shows(NORTH, 34, dead=1)
            await page.wait_for_function(
                "() => Number(document.getElementById('kpi-fps').textContent) > 0", timeout=20_000
            )
            await page.select_option("#source", SOUTH)
            await shows(SOUTH, 16, dead=0)
            # Every source has a card whose thumbnail loaded.
            await page.wait_for_function(
                "() => { const imgs = [...document.querySelectorAll('.src-card img')];"
                " return imgs.length === 2"
                " && imgs.every(i => !i.hidden && i.complete && i.naturalWidth > 0); }",
                timeout=20_000,
            )
            await page.select_option("#source", NORTH)
            await shows(NORTH, 34, dead=1)
            # Opened with nothing chosen, the page shows the camera that sent a frame last, not
            # the first name in the list (a newcomer's live camera among long-stopped ones).
            await produce_frames(
                services.bootstrap, topic, [(SOUTH, images[0])], start_ms=int(time.time() * 1000)
            )
            await wait_for(
                lambda: _frames_counted(redis_client, key_prefix, SOUTH, 17),
                "the last south frame was not counted",
            )
            fresh = await browser.new_page(viewport={"width": 1440, "height": 1000})
            try:
                await fresh.goto(server.url, wait_until="load")
                await fresh.wait_for_function(
                    "want => document.body.dataset.counts === want", arg=f"{SOUTH}|1m|17", timeout=30_000
                )
            finally:
                await fresh.close()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert problems == [], f"the page logged errors: {problems}"
        finally:
            await page.close()
            await server.stop()


async def test_dashboard_beyond_loopback_refuses_to_start_without_a_token() -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "stream_worker.cli", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token-file" in lines[0], result.stderr


async def test_cli_dashboard_with_a_token_wants_it_on_every_route_but_the_probes(
    services: Services, key_prefix: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stream_worker.cli",
        "dashboard",
        "--host=0.0.0.0",
        "--port=0",
        f"--token-file={token_file}",
        f"--redis-url={services.redis_url}",
        f"--key-prefix={key_prefix}",
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(60):
            line = ""
            while not line.startswith("dashboard: http://"):
                raw = await process.stderr.readline()
                assert raw, f"stream-worker dashboard exited ({await process.wait()}) before serving"
                line = raw.decode()
        base = line.split()[1].rstrip("/")
        status, headers, _ = await http_get(f"{base}/api/stats")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert (await http_get(f"{base}/", {"Authorization": "Bearer wrong"}))[0] == 401
        status, _, body = await http_get(f"{base}/api/stats", {"Authorization": "Bearer s3cret-token"})
        assert status == 200 and json.loads(body)["sources"] == []
        basic = base64.b64encode(b"operator:s3cret-token").decode()
        status, headers, body = await http_get(f"{base}/", {"Authorization": f"Basic {basic}"})
        assert status == 200 and b"lookout" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        # The probes need no token: a kubelet has none. Ready means Redis answers too.
        assert (await http_get(f"{base}/healthz"))[0] == 200
        assert (await http_get(f"{base}/readyz"))[0] == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _frames_counted(client: aioredis.Redis, key_prefix: str, source: str, frames: int) -> bool:
    return bool((await counts_in_redis(client, key_prefix, source, "1m"))["_frames"] == frames)


def test_throughput_is_the_counter_slope_over_the_last_seconds() -> None:
    rates = RateTracker(horizon_s=10.0)
    assert rates.observe("cam", Reading(0.0, 0, 0)) == (None, None)
    assert rates.observe("cam", Reading(2.0, 40, 1)) == (20.0, 0.5)
    for t in range(4, 31, 2):
        fps, dead_per_s = rates.observe("cam", Reading(float(t), 20 * t, 1))
    # Only the last ~10 s count: the dead letter at t=2 no longer shows as a rate.
    assert fps == 20.0 and dead_per_s == 0.0
    # A counter that restarts (its Redis hash expired) is a new history, not a negative rate.
    assert rates.observe("cam", Reading(32.0, 5, 0)) == (None, None)
