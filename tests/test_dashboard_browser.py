"""Phase 3's dashboard in a real headless browser: a real ``taskman serve``, Basic
auth answered by Chromium, our queue listed, a failed task whose message holds
markup shown as text and never run as script.

Needs Debian's chromium (.ci/run installs it) and playwright (the dev extra).
Without them the test is skipped, except under CI, where it fails.
"""

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from taskman.redis_server import free_port
from tests.browser import chromium, needs_browser
from tests.processes import stop, taskman, wait_http

if TYPE_CHECKING:
    from playwright.sync_api import Browser

USERNAME = "admin"
PASSWORD = "correct horse battery staple"
QUEUE = "taskman"
# Would set a flag and open an alert if the dashboard inserted it as HTML.
MESSAGE = 'boom <img src=x onerror="window.__xss=1;alert(1)"> & more'


pytestmark = needs_browser


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real phase-3 server with its own Redis and one worker, and a task of ours
    that has failed: ``{"base": url, "task": task, "tmp": folder}`` (screenshots
    and the server's log go to the folder)."""
    tmp = tmp_path_factory.mktemp("dashboard-browser")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = taskman(
        "serve",
        *("--phase", "3", "--port", str(port), "--workers", "1"),
        env={
            "TASKMAN_DASHBOARD_USERNAME": USERNAME,
            "TASKMAN_DASHBOARD_PASSWORD": PASSWORD,
            "TASKMAN_DATA_DIR": str(tmp / "data"),
            "TASKMAN_REDIS_URL": "",  # its own embedded Redis
            "TASKMAN_QUEUE_NAME": QUEUE,
            "TASKMAN_RETRY_BACKOFF": "0",
        },
        log=tmp / "serve.log",
    )
    try:
        wait_http(f"{base}/health", process=process)
        with httpx.Client(base_url=base, timeout=10) as client:
            response = client.post(
                "/tasks",
                json={
                    "type": "fail",
                    "payload": {"message": MESSAGE},
                    "max_retries": 0,
                },
            )
            assert response.status_code == 202, response.text
            task = response.json()
            deadline = time.monotonic() + 30
            while task["status"] != "failed":
                assert time.monotonic() < deadline, task
                time.sleep(0.05)
                task = client.get(f"/tasks/{task['id']}").json()
        assert MESSAGE in task["error"]
        yield {"base": base, "task": task, "tmp": tmp}
    finally:
        stop(process, timeout=30)


def test_without_credentials_the_browser_gets_401(
    browser: "Browser", server: dict[str, Any]
) -> None:
    from playwright.sync_api import Error

    base = server["base"]
    context = browser.new_context()
    try:
        page = context.new_page()
        # No credentials: the 401 and its Basic challenge, as the page's own
        # script sees them (credentials "omit": no login prompt in the way).
        page.goto(f"{base}/health")
        status, challenge = page.evaluate(
            """async () => {
                const r = await fetch("/dashboard/", {credentials: "omit"});
                return [r.status, r.headers.get("www-authenticate")];
            }"""
        )
        assert status == 401
        assert challenge.startswith('Basic realm="taskman dashboard"')
        # A navigation brings up the login prompt. Headless there is none to
        # answer: Chromium gives up on the page (or shows the 401 itself).
        try:
            response = context.new_page().goto(f"{base}/dashboard/")
        except Error as error:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in error.message
        else:
            assert response is not None
            assert response.status == 401
    finally:
        context.close()
    # A wrong password: the browser offers it once, and shows the 401 it gets.
    context = browser.new_context(
        http_credentials={"username": USERNAME, "password": "wrong"}
    )
    try:
        page = context.new_page()
        response = page.goto(f"{base}/dashboard/")
        assert response is not None
        assert response.status == 401
        assert "needs a username and password" in page.inner_text("body")
    finally:
        context.close()


def test_the_dashboard_shows_our_queue_and_the_failed_task_as_text(
    browser: "Browser", server: dict[str, Any]
) -> None:
    from playwright.sync_api import Dialog, Request, Response, expect

    task_id = server["task"]["id"]
    context = browser.new_context(
        http_credentials={"username": USERNAME, "password": PASSWORD}
    )
    dialogs: list[str] = []
    errors: list[str] = []
    broken: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def on_response(response: Response) -> None:
        # 401 is the challenge the browser answers with the credentials.
        if response.status >= 400 and response.status != 401:
            broken.append(f"{response.status} {response.url}")

    def on_request_failed(request: Request) -> None:
        # Leaving a page aborts what it was still loading (the dashboard's
        # script polls): not a failure of the server.
        if request.failure != "net::ERR_ABORTED":
            broken.append(f"{request.failure} {request.url}")

    try:
        page = context.new_page()
        page.on("dialog", on_dialog)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("requestfailed", on_request_failed)
        page.on("response", on_response)

        # The bare mount redirects into the dashboard, whose page lists the queue.
        page.goto(f"{server['base']}/dashboard")
        assert page.url == f"{server['base']}/dashboard/"
        row = page.locator("#queues tr[data-role=queue]", has_text=QUEUE)
        expect(row).to_have_count(1)
        expect(row.locator("td").first).to_have_text(QUEUE)
        expect(row.locator("td.failed a").first).to_have_text("1")
        page.screenshot(path=server["tmp"] / "queues.png")

        # Its failed count links to the failed registry, which lists our task.
        row.locator("td.failed a").first.click()
        page.wait_for_url(f"**/dashboard/0/view/jobs/{QUEUE}/failed/**")
        link = page.get_by_role("link", name=task_id, exact=True)
        expect(link).to_be_visible()
        expect(page.locator("#jobs")).to_contain_text(f"RuntimeError: {MESSAGE}")
        assert page.locator("#jobs img").count() == 0
        page.screenshot(path=server["tmp"] / "failed.png", full_page=True)

        # The task's own page: its id, and the message as text.
        link.click()
        page.wait_for_url(f"**/dashboard/0/view/job/{task_id}")
        expect(page.locator("h2")).to_contain_text(task_id)
        expect(page.locator("pre.exc_info")).to_contain_text(f"RuntimeError: {MESSAGE}")
        expect(page.locator("#job-data")).to_contain_text("failed")
        page.screenshot(path=server["tmp"] / "job.png", full_page=True)

        # The markup stayed text on both pages: no element made of it, no script
        # run, no alert.
        assert page.locator("#job-data img").count() == 0
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert dialogs == []
        assert errors == []
        assert broken == []
    finally:
        context.close()
