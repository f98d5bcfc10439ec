"""rq-dashboard at /dashboard: a Flask app behind our own ASGI gate (Basic auth, a
same-origin check on anything that changes state), with its XSS holes closed.
Off unless TASKMAN_DASHBOARD_PASSWORD is set.
"""

import base64
import functools
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import redis
import rq_dashboard
import rq_dashboard.web
from a2wsgi import WSGIMiddleware
from fastapi import FastAPI
from flask import Flask, Response, current_app, request
from flask.json.provider import DefaultJSONProvider
from flask.templating import DispatchingJinjaLoader
from jinja2 import Environment
from rq import Queue, Worker, requeue_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from werkzeug.exceptions import HTTPException

from common.backend import BackendUnavailable
from common.settings import Settings
from phase2_queue.jobs import connect
from phase2_queue.outages import unavailable_when_redis_is_down

log = logging.getLogger("taskman")

PREFIX = "/dashboard"
REALM = "taskman dashboard"

# Every path the dashboard serves is made of these (queue names, registry names,
# job ids, static files). Anything else is refused before Flask sees it, which
# also closes a reflected XSS: rq-dashboard 0.9 writes the queue name from the URL
# into a JavaScript string unescaped (jobs.js, `$(this).val('{{ queue.name }}')`).
SAFE_PATH = re.compile(r"[A-Za-z0-9/._:~-]*")

# No sniffing (a JSON answer is never rendered as a page), no framing (a hidden
# frame could trick the admin into clicking "Empty queue").
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"referrer-policy", b"same-origin"),
]

# A response is an ASGI app that answers the same every time (and, unlike a plain
# function, a Route takes it as one).
NOT_FOUND = JSONResponse({"detail": "Not Found"}, status_code=404)

# What the dashboard's paths may name; rq-dashboard reads anything else as a
# server error (a registry it does not know, per_page 0 divides by zero, a page
# past 2**63 overflows Redis) or as something it is not (an unknown registry's
# "empty" answers OK having emptied nothing).
REGISTRIES = (
    "queued",
    "started",
    "finished",
    "failed",
    "deferred",
    "scheduled",
    "canceled",
)
MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000

# Underscore templates: `<%= x %>` inserts x as raw HTML, `<%- x %>` escapes it.
RAW_INTERPOLATION = re.compile(r"<%=(.*?)%>", re.DOTALL)
# `'{{ name }}'` inside a JavaScript include, where Jinja does not autoescape.
QUOTED_JINJA_IN_JS = re.compile(r"'\{\{\s*([\w.]+)\s*\}\}'")


def harden_template(source: str) -> str:
    """rq-dashboard's templates with every interpolation of job data escaped.

    Its job page (job.html) inserts description, result, metadata and exception
    text with `<%= %>`, i.e. as HTML, and its workers page does the same with the
    running job's call string (its arguments): a task whose error message or
    payload holds `<img src=x onerror=...>` runs script in the admin's browser.
    """

    def escaped(match: re.Match[str]) -> str:
        expression = match[1]
        # `$('<div/>').text(x).html()` is already escaped by jQuery; escaping it
        # again would show `&lt;` to the reader.
        if expression.strip().endswith(".html()"):
            return match[0]
        return f"<%-{expression}%>"

    source = RAW_INTERPOLATION.sub(escaped, source)
    return QUOTED_JINJA_IN_JS.sub(r"{{ \1|tojson }}", source)


class _HardenedTemplates(DispatchingJinjaLoader):
    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source, filename, uptodate = super().get_source(environment, template)
        if template.startswith("rq_dashboard/"):
            source = harden_template(source)
        return source, filename, uptodate


class _HtmlSafeJSON(DefaultJSONProvider):
    """JSON whose strings cannot be read as markup: <, >, & and ' as \\u escapes.

    The same JSON to a JSON parser; inert if a browser or a template treats it as
    HTML.
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        text = super().dumps(obj, **kwargs)
        for char in "<>&'":
            text = text.replace(char, f"\\u{ord(char):04x}")
        return text


class _DashboardFlask(Flask):
    json_provider_class = _HtmlSafeJSON

    def create_global_jinja_loader(self) -> DispatchingJinjaLoader:
        return _HardenedTemplates(self)


def _json_by_default(cls: Any) -> Any:
    """An RQ class (Job, Queue, Worker) whose serializer is JSON unless given."""

    class JSONByDefault(cls):  # type: ignore[misc]
        def __init__(self, *args: Any, serializer: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, serializer=serializer or JSONSerializer, **kwargs)

    JSONByDefault.__name__ = JSONByDefault.__qualname__ = cls.__name__
    return JSONByDefault


def redacted_redis_urls(urls: str | Sequence[str]) -> list[str]:
    """Each Redis URL as scheme, host, port and database: no user, password or
    options."""
    redacted = []
    for url in [urls] if isinstance(urls, str) else urls:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # not a number: not ours to show
            port = ""
        redacted.append(f"{parts.scheme}://{host}{port}{parts.path}")
    return redacted


def create_dashboard_app(settings: Settings) -> Flask:
    """rq-dashboard as a Flask app, reading our Redis with RQ's JSONSerializer,
    through the client connect() makes (so it follows a Sentinel failover)."""
    # base.html links the app's own "static" endpoint (the favicon): serve
    # rq-dashboard's static folder under both names.
    static = Path(rq_dashboard.__file__).parent / "static"
    app = _DashboardFlask(__name__, static_folder=str(static))
    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = _shown_url(settings)
    app.taskman_redis = connect(settings)  # type: ignore[attr-defined]
    # Module globals in rq-dashboard 0.9, not Flask settings: every dashboard in
    # this process reads jobs the way our workers write them.
    web: Any = rq_dashboard.web
    web.config.serializer = JSONSerializer
    # Not every view passes that on: the job page, delete, requeue and the workers
    # list use RQ's default, pickle, and unpickling what is in Redis runs any code
    # written there. So the classes and the helper they use default to JSON.
    web.Job, web.Queue, web.Worker = map(_json_by_default, (Job, Queue, Worker))
    web.requeue_job = functools.partial(requeue_job, serializer=JSONSerializer)
    # Its list of Redis instances hides the URL's password, not its query string
    # (where redis-py reads one too): show where Redis is, nothing more.
    web.escape_format_instance_list = redacted_redis_urls
    # It makes a client from the URL (at start, and again on every request that
    # names the instance): ours instead, the one connect() made for this app.
    web.from_url = _this_apps_redis
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="")
    with app.app_context():
        rq_dashboard.web.setup_rq_connection(app)

    @app.before_request
    def refuse_state_change_by_get() -> Response | None:
        # "Requeue all" answers GET as well as POST, so that an <img> on any page
        # could requeue every failed job with the admin's cached credentials. The
        # dashboard's own buttons POST.
        rule = request.url_rule
        if (
            request.method in ("GET", "HEAD")
            and rule
            and "POST" in (rule.methods or ())
        ):
            return _json_error(app, 405, "this action needs POST", {"Allow": "POST"})
        return None

    @app.before_request
    def refuse_what_the_path_cannot_name() -> Response | None:
        # Before rq-dashboard's own before_request, which picks the Redis instance.
        instances = len(app.config["RQ_DASHBOARD_REDIS_URL"])
        detail = _bad_path_argument(request.view_args or {}, instances)
        return None if detail is None else _json_error(app, 404, detail)

    @app.before_request
    def compact_an_empty_queue_as_a_no_op() -> Response | None:
        # RQ's Queue.compact() renames the queue's list, and Redis refuses to rename
        # a key that is not there ("no such key", a 500): an empty queue.
        if request.endpoint != "rq_dashboard.compact_queue":
            return None
        name = (request.view_args or {}).get("queue_name", "")
        queue = Queue(name, connection=app.redis_conn)  # type: ignore[attr-defined]
        if queue.count:
            return None
        return Response(app.json.dumps({"status": "OK"}), mimetype="application/json")

    @app.errorhandler(NoSuchJobError)
    def job_not_found(error: NoSuchJobError) -> Response:
        return _json_error(app, 404, "job not found")

    @app.errorhandler(redis.RedisError)
    def redis_trouble(error: redis.RedisError) -> Response:
        # The API's own reading of Redis trouble (away, wrong password, refusing
        # writes): the same 503 and words. Anything else stays a bug (a 500).
        try:
            with unavailable_when_redis_is_down():
                raise error
        except BackendUnavailable as unavailable:
            return _json_error(app, 503, str(unavailable), unavailable.headers)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        # Flask's own pages (404, 405, a 500 for a bug) as our JSON errors; the
        # traceback of a 500 is in the log.
        code = error.code or 500
        detail = "internal server error" if code >= 500 else error.name
        return _json_error(app, code, detail)

    return app


def _this_apps_redis(*args: Any, **kwargs: Any) -> tuple[None, redis.Redis]:
    """rq-dashboard's from_url(), answered with the current app's client."""
    return None, current_app.taskman_redis  # type: ignore[attr-defined]


def _shown_url(settings: Settings) -> str:
    """Where the dashboard says Redis is (redacted_redis_urls shows it)."""
    if settings.redis_sentinels:
        first = settings.redis_sentinels[0]
        return f"redis+sentinel://{first}/{settings.redis_sentinel_master}"
    return str(settings.redis_url)


def _bad_path_argument(args: dict[str, Any], instances: int) -> str | None:
    """What is wrong with a dashboard path's arguments, if anything."""
    if "instance_number" in args and not 0 <= args["instance_number"] < instances:
        return f"no Redis instance {args['instance_number']}"
    registry = args.get("registry_name")
    if registry is not None and registry not in REGISTRIES:
        return f"no registry {registry!r}; one of {', '.join(REGISTRIES)}"
    for name, limit in (("per_page", MAX_PER_PAGE), ("page", MAX_PAGE)):
        value = str(args.get(name, 1))
        if not (value.isdigit() and 1 <= int(value) <= limit):
            return f"{name} must be a whole number from 1 to {limit}"
    return None


def _json_error(
    app: Flask, status: int, detail: str, headers: dict[str, str] | None = None
) -> Response:
    body = app.json.dumps({"detail": detail})
    return Response(body, status, headers, mimetype="application/json")


class DashboardGate:
    """Pure ASGI, in front of the dashboard: Basic auth on every request, then a
    same-origin check on anything but GET/HEAD (Basic credentials are cached by
    the browser and sent along with a forged cross-site POST, like a cookie)."""

    def __init__(self, app: ASGIApp, username: str, password: str) -> None:
        self.app = app
        self._username = username.encode()
        self._password = password.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.raw.append((name, value))
            await send(message)

        if not self.authorized(scope):
            response = JSONResponse(
                {"detail": "the dashboard needs a username and password"},
                status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        elif scope["method"] not in ("GET", "HEAD") and not same_origin(scope):
            response = JSONResponse(
                {"detail": "cross-site request refused"}, status_code=403
            )
        elif not SAFE_PATH.fullmatch(scope["path"]):
            response = NOT_FOUND
        else:
            await self.app(scope, receive, send_secured)
            return
        await response(scope, receive, send_secured)

    def authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return False
        username, colon, password = decoded.partition(b":")
        # Both compared, always, in constant time: the answer's timing tells
        # nothing about which part was wrong or how much of it was right.
        username_ok = secrets.compare_digest(username, self._username)
        password_ok = secrets.compare_digest(password, self._password)
        return bool(colon) & username_ok & password_ok


def same_origin(scope: Scope) -> bool:
    """Does the Origin (else the Referer) name the host the request was sent to?

    Neither header: not a browser, or one that hides both; nothing to compare.
    """
    headers = Headers(scope=scope)
    source = headers.get("origin") or headers.get("referer")
    if source is None:
        return True
    origin = urlsplit(source)
    if origin.scheme not in ("http", "https") or not origin.netloc:
        return False  # "null" (sandboxed frame, privacy redirect) or junk
    host = urlsplit(f"//{headers.get('host', '')}")
    try:
        return (origin.hostname, _port(origin.scheme, origin.port)) == (
            host.hostname,
            _port(origin.scheme, host.port),
        )
    except ValueError:  # a port that is not a number
        return False


def _port(scheme: str, port: int | None) -> int:
    return port or (443 if scheme == "https" else 80)


async def _to_slash(scope: Scope, receive: Receive, send: Send) -> None:
    response = RedirectResponse(scope["path"] + "/")
    await response(scope, receive, send)


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """Serve rq-dashboard at /dashboard if a password is set; 404 there if not."""
    if not settings.dashboard_password:
        log.info(
            "dashboard off: set TASKMAN_DASHBOARD_PASSWORD (user "
            "TASKMAN_DASHBOARD_USERNAME, default admin) to serve it at %s",
            PREFIX,
        )
        bare: ASGIApp = NOT_FOUND
        mounted: ASGIApp = NOT_FOUND
    else:
        if not settings.redis_configured:
            raise ValueError(
                "the dashboard reads Redis: set TASKMAN_REDIS_URL or "
                "TASKMAN_REDIS_SENTINELS"
            )
        user, password = settings.dashboard_username, settings.dashboard_password
        flask_app: Any = create_dashboard_app(settings)
        # a2wsgi declares its own ASGI/WSGI types; they mean the same as starlette's.
        dashboard = cast(ASGIApp, WSGIMiddleware(flask_app))
        bare = DashboardGate(_to_slash, user, password)
        mounted = DashboardGate(dashboard, user, password)
    # The mount serves /dashboard/...; /dashboard itself would otherwise get the
    # router's redirect before any auth.
    app.router.routes.append(Route(PREFIX, bare, include_in_schema=False))
    app.mount(PREFIX, mounted, name="dashboard")
