"""Headless Chromium for the real-browser tests (the dashboard's, the docs').

Needs Debian's chromium (.ci/run installs it) and playwright (the dev extra).
Without them a browser test is skipped, except under CI, where it fails.
"""

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
# Downloads from outside are blocked: Chromium must not reach for Google's
# services (updates, sync, QUIC probes). As root it needs --no-sandbox. Playwright
# gives every launch a fresh temporary profile (--user-data-dir) of its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -e '.[dev]'"
    if not CHROMIUM.exists():
        return f"no browser at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    return None


MISSING = _missing()
# A browser test module's pytestmark.
needs_browser = pytest.mark.skipif(
    MISSING is not None and not IN_CI, reason=f"no headless browser: {MISSING}"
)


@contextmanager
def chromium(*extra_args: str) -> Iterator["Browser"]:
    """Headless Chromium, launched by playwright; fails (under CI) if missing."""
    if MISSING:
        pytest.fail(f"CI must run the browser test, but {MISSING}")
    from playwright.sync_api import expect, sync_playwright

    # Room for a slow machine: the pages load their data by script.
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
        )
        try:
            yield browser
        finally:
            browser.close()
