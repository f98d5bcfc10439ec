"""/docs (Swagger UI) and /redoc in a real headless browser that can reach
nothing but the server on 127.0.0.1: both render the API from the app's own
files (fastapi-offline's assets), with no CDN and no font service.

Needs Debian's chromium and playwright (tests/browser.py).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from common.tasks import TASKS
from taskman.redis_server import free_port
from tests.browser import chromium, needs_browser
from tests.processes import stop, taskman, wait_http

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

pytestmark = needs_browser

# Any name but the loopback resolves to nothing: no page can reach a CDN, even
# on a machine with a network.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    with chromium(OFFLINE) as browser:
        yield browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real ``taskman serve --phase 1``: its URL, and a folder for screenshots."""
    tmp = tmp_path_factory.mktemp("docs-browser")
    port = free_port()
    process = taskman(
        *("serve", "--phase", "1", "--port", str(port)), log=tmp / "serve.log"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", process=process)
        yield {"base": base, "tmp": tmp}
    finally:
        stop(process, timeout=30)


class Watch:
    """What a page asked for outside the server, and what went wrong on it."""

    def __init__(self, page: "Page", base: str) -> None:
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.here = urlsplit(base).netloc

        def route(route: "Route") -> None:
            url = route.request.url
            if urlsplit(url).netloc == self.here or url.startswith("data:"):
                route.continue_()
            else:  # the page wanted the network: refuse, and remember
                self.outside.append(url)
                route.abort()

        page.route("**/*", route)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "response",
            lambda r: (
                self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
            ),
        )

    def assert_clean(self) -> None:
        assert self.outside == [], f"the page reached outside: {self.outside}"
        assert self.errors == []
        assert self.failed == []


def test_swagger_ui_renders_every_operation_offline(
    browser: "Browser", server: dict[str, Any]
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    watch = Watch(page, server["base"])
    try:
        page.goto(f"{server['base']}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text(
            "taskman, phase 1"
        )
        blocks = page.locator(".opblock")
        expect(blocks).to_have_count(7)  # the six task routes and /health
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/tasks/{task_id}/events" in [p.replace("\u200b", "") for p in paths]
        # The union's members are listed among the schemas.
        models = page.locator("section.models")
        for name in TASKS:
            expect(models).to_contain_text(f"{name.capitalize()}Task")
        # POST /tasks opens onto its body and its documented errors.
        page.locator(".opblock-post .opblock-summary", has_text="/tasks").first.click()
        expect(page.locator(".opblock.is-open .responses-table")).to_contain_text("409")
        expect(page.locator(".opblock.is-open .responses-table")).to_contain_text("413")
        page.screenshot(path=Path(server["tmp"]) / "swagger.png", full_page=True)
        watch.assert_clean()
    finally:
        page.close()


def test_redoc_renders_the_api_offline(
    browser: "Browser", server: dict[str, Any]
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    watch = Watch(page, server["base"])
    try:
        page.goto(f"{server['base']}/redoc")
        content = page.locator(".api-content")
        expect(content).to_contain_text("taskman, phase 1")
        expect(content).to_contain_text("Is the service")  # the last operation
        # Each operation has its own section, by its id.
        sections = page.evaluate(
            """() => [...document.querySelectorAll(
                ".api-content [data-section-id^='operation/']"
            )].map(element => element.dataset.sectionId)"""
        )
        assert len(set(sections)) == 7, sections
        expect(content).to_contain_text("Queue a task")
        expect(content).to_contain_text("Follow a task as it runs")
        # The body of POST /tasks is the union, told by type: its first choice
        # shows with its payload's model and limits.
        expect(content).to_contain_text("object (EchoPayload)")
        expect(content).to_contain_text("at most 16384 bytes")
        page.screenshot(path=Path(server["tmp"]) / "redoc.png", full_page=True)
        watch.assert_clean()
    finally:
        page.close()
