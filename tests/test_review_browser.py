"""The review page in a real headless browser (Debian's chromium through Playwright): label ten
stones by keyboard only, undo one, check labels.jsonl; and the README's screenshot (docs/review.png).

Skipped where chromium or Playwright is missing, unless SORTERD_REQUIRE_BROWSER=1 (CI sets it):
then missing is a failure.  Playwright never downloads a browser here: it launches /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorterd.domain import CLARITIES, COLORS
from tests.reviewdata import flagged_dataset

# A stone on the page: its id (the page also says "–" before it starts and "enter your name first"
# or "no stones to label": none of them a stone to read).
STONE_SHOWN = re.compile(r"S\d{6}")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).parent.parent / "docs" / "review.png"


def _need_browser() -> None:
    missing = []
    try:
        import aiohttp  # noqa: F401
        import playwright  # noqa: F401
    except ModuleNotFoundError as exc:
        missing.append(f"python package {exc.name}")
    if not shutil.which(CHROMIUM):
        missing.append(CHROMIUM)
    if missing:
        why = f"needs {' and '.join(missing)} (pip install -e '.[test,trainer]'; apt-get install chromium)"
        if os.environ.get("SORTERD_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The review app on loopback, in its own thread and event loop (Playwright's sync API owns this one)."""
    _need_browser()
    from sorterd.trainer.review.app import make_app, start_site

    flagged_dataset(tmp_path, 30, seed=5)
    ready = threading.Event()
    box: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        runner, port = await start_site(make_app(tmp_path), "127.0.0.1", 0)
        box["url"], box["runner"] = f"http://127.0.0.1:{port}/", runner
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(30), "the review server did not start"
    yield str(box["url"]), tmp_path
    runner = box["runner"]
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_ten_stones_by_keyboard_then_one_undo(server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, root = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        page.fill("#annotator", "duke")
        page.press("#annotator", "Enter")
        expect(page.locator("#stone-id")).to_have_text(STONE_SHOWN, timeout=10_000)
        shown: list[str] = []
        for i in range(10):
            sid = page.locator("#stone-id").inner_text()
            assert sid not in shown  # the page advanced by itself
            shown.append(sid)
            if i == 4:
                page.keyboard.press("m")  # a flag: one key
            page.keyboard.press("123"[i % 3])
            page.keyboard.press("qwe"[(i // 3) % 3])
            expect(page.locator("#stone-id")).not_to_have_text(sid, timeout=10_000)
        expect(page.locator("#queue-length")).to_contain_text("labelled 10", timeout=10_000)
        page.keyboard.press("u")
        expect(page.locator("#stone-id")).to_have_text(shown[-1], timeout=10_000)  # the undone stone is back
        expect(page.locator("#queue-length")).to_contain_text("labelled 9", timeout=10_000)
        assert page.evaluate("localStorage.getItem('sorterd-annotator')") == "duke"
        browser.close()
    lines = [json.loads(x) for x in (root / "labels.jsonl").read_text().splitlines()]
    labels, retractions = [x for x in lines if not x.get("retract")], [x for x in lines if x.get("retract")]
    assert [x["stone_id"] for x in labels] == shown and [x["stone_id"] for x in retractions] == shown[-1:]
    for i, x in enumerate(labels):
        assert (x["color"], x["clarity"], x["annotator"]) == (COLORS[i % 3], CLARITIES[(i // 3) % 3], "duke")
        assert x["mixed"] is (i == 4)
    queue = [json.loads(x) for x in (root / "unlabelled.jsonl").read_text().splitlines()]
    by_priority = sorted(queue, key=lambda q: (-q["priority"], q["stone_id"]))
    assert shown == [q["stone_id"] for q in by_priority[:10]]  # highest priority first
    from sorterd.data.dataset import effective_labels

    assert [lab.stone_id for lab in effective_labels(root)] == shown[:9]


def test_screenshot_of_the_page(server: tuple[str, Path]) -> None:
    """docs/review.png for the README: 30 flagged stones, a few labelled, the full frames shown."""
    from playwright.sync_api import expect, sync_playwright

    url, root = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.fill("#annotator", "duke")
        page.press("#annotator", "Enter")
        expect(page.locator("#stone-id")).to_have_text(STONE_SHOWN, timeout=10_000)
        for keys in ("1q", "2w", "1e", "3q", "1w", "2q"):
            sid = page.locator("#stone-id").inner_text()
            for k in keys:
                page.keyboard.press(k)
            expect(page.locator("#stone-id")).not_to_have_text(sid, timeout=10_000)
        page.keyboard.press("a")
        page.keyboard.press("f")
        expect(page.locator("#queue-length")).to_contain_text("labelled 6", timeout=10_000)
        out = Path(os.environ.get("SORTERD_SCREENSHOT", root / "review.png"))
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    assert out.stat().st_size > 10_000 and out.read_bytes().startswith(b"\x89PNG")
