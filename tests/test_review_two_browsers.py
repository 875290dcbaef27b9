"""Two annotators in two browsers at once (headless chromium, separate profiles) on the same
stones: every label either of them typed is stored (labels.jsonl or review/checks.jsonl), none
lost, no stone with two live first labels; then the §3.3 gold round and κ per head on the page,
the same numbers as GET /api/agreement.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorterd.domain import CLARITIES, COLORS
from tests.reviewdata import flagged_dataset
from tests.test_review_browser import ARGS, CHROMIUM, _need_browser

# A stone on the page: its id (the page also says "–" before it starts and "enter your name first"
# or "no stones to label": none of them a stone to read).
STONE_SHOWN = re.compile(r"S\d{6}")

N = 12


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The review app on loopback in its own thread and loop (Playwright's sync API owns this one)."""
    _need_browser()
    from sorterd.trainer.review.app import make_app, start_site

    flagged_dataset(tmp_path, N, seed=9)
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
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_two_annotators_at_once_lose_nothing_and_the_page_shows_kappa(server: tuple[str, Path]) -> None:
    from playwright.sync_api import Page, expect, sync_playwright

    url, root = server
    typed: dict[tuple[str, str], tuple[str, str]] = {}  # (stone, annotator) -> (colour, clarity)

    def label_current(page: Page, who: str, i: int, shift: int) -> str:
        sid = page.locator("#stone-id").inner_text()
        color, clarity = (i + shift) % 3, i % 3
        page.keyboard.press("123"[color])
        page.keyboard.press("qwe"[clarity])
        typed[(sid, who)] = (COLORS[color], CLARITIES[clarity])
        return sid

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pages = {}
        for who in ("duke", "ann"):
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()  # own localStorage
            page.goto(url)
            page.fill("#annotator", who)
            page.press("#annotator", "Enter")
            expect(page.locator("#stone-id")).to_have_text(STONE_SHOWN, timeout=10_000)
            pages[who] = page
        # At once: both type before either page is waited on (their POSTs race at the server).
        for i in range(5):
            sids = {who: label_current(page, who, i, 1 if who == "ann" else 0) for who, page in pages.items()}
            for who, page in pages.items():
                expect(page.locator("#stone-id")).not_to_have_text(sids[who], timeout=10_000)
        for page in pages.values():
            page.wait_for_load_state("networkidle")
        stored = lines(root / "labels.jsonl") + lines(root / "review" / "checks.jsonl")
        assert {(str(x["stone_id"]), str(x["annotator"])): (x["color"], x["clarity"]) for x in stored} == typed
        assert len(stored) == len(typed) == 10  # nothing lost, nothing twice
        firsts = [x["stone_id"] for x in lines(root / "labels.jsonl")]
        assert len(firsts) == len(set(firsts))  # one live first label per stone

        # §3.3: duke chooses the gold set (the stones labelled so far); ann labels it blind.
        duke, ann = pages["duke"], pages["ann"]
        duke.click("#make-gold")
        expect(duke.locator("#status")).to_contain_text("gold set:", timeout=10_000)
        gold = json.loads((root / "review" / "gold.json").read_text())["stone_ids"]
        ann.select_option("#mode", "gold")
        todo = [s for s in gold if (s, "ann") not in typed]
        for i in range(len(todo)):
            expect(ann.locator("#stone-id")).to_have_text(STONE_SHOWN, timeout=10_000)
            sid = label_current(ann, "ann", i, 1)
            expect(ann.locator("#stone-id")).not_to_have_text(sid, timeout=10_000)
        with urllib.request.urlopen(url + "api/agreement", timeout=30) as r:
            pairs = json.loads(r.read())["pairs"]
        assert pairs and {p["first"] for p in pairs} <= {"duke", "ann"}
        shared = sum(p["stones"] for p in pairs)
        assert shared >= len(gold)  # every gold stone has both labels now
        assert shared == len([s for s in {k[0] for k in typed} if (s, "duke") in typed and (s, "ann") in typed])
        duke.reload()
        for p in pairs:
            text = (f"{p['first']} vs {p['second']}: {p['stones']} stones, κ colour "
                    f"{'–' if p['kappa_color'] is None else format(p['kappa_color'], '.2f')}")
            expect(duke.locator("#agreement")).to_contain_text(text, timeout=10_000)
            assert p["kappa_color"] is not None and p["kappa_clarity"] is not None
        expect(duke.locator("#agreement")).to_contain_text("κ clarity", timeout=10_000)
        browser.close()
