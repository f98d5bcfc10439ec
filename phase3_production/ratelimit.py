"""Per-client rate limits on the task routes, counted in Redis so that every API
process shares them; 429 + Retry-After past the limit, RateLimit headers always.

A moving-window limit of 200 or more per window is counted in blocks (allowance.py):
each API process reserves up to ``limit // 100`` (at most 100) requests of the
client's budget in Redis at once and spends them locally. The API processes together
still never admit more than the limit; the error bound is one-sided: a client may be
refused up to ``block - 1`` requests per API process below it, and the remaining
count ``r`` in the headers is an estimate. Smaller limits, and the other strategies,
count every request in Redis, exactly.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import limits
from limits import RateLimitItem
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from redis.exceptions import NoScriptError, RedisError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.settings import Settings
from phase3_production.allowance import Allowances, block_size
from phase3_production.autopipeline import AutoPipeline
from phase3_production.client_keys import ClientKeys
from phase3_production.redis_client import connect_async

log = logging.getLogger("taskman")

Kind = Literal["submit", "read"]

STRATEGIES: dict[str, type[RateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}

# What a Redis that is down, slow or restarting looks like from here.
STORAGE_ERRORS = (StorageError, RedisError, OSError, TimeoutError)

# After Redis failed, do not ask it again for this long: with Redis gone, every
# request would otherwise pay a connect attempt (or a timeout) first.
REDIS_BACKOFF_SECONDS = 1.0
# A rate limiter that waits for Redis longer than this slows down every request.
REDIS_TIMEOUT_SECONDS = 0.5
# Memos per client (its key, its Redis keys) hold at most this many entries.
MEMO_SIZE = 10_000


def storage_uri(redis_url: str) -> str:
    """Our redis:// URL as limits' async storage URI (user, password, db kept)."""
    scheme, separator, rest = redis_url.partition("://")
    schemes = {
        "redis": "async+redis",
        "rediss": "async+rediss",
        "unix": "async+redis+unix",
    }
    if not separator or scheme not in schemes:
        raise ValueError(f"not a redis://, rediss:// or unix:// URL: {scheme}://...")
    return f"{schemes[scheme]}://{rest}"


def parse_limits(text: str) -> list[RateLimitItem]:
    """``"20/second;600/minute"`` as limits items; empty means no limit."""
    return limits.parse_many(text) if text.strip() else []


@dataclass(frozen=True)
class Policy:
    """One limit of a kind of request, named for the RateLimit headers."""

    name: str
    item: RateLimitItem

    @property
    def window(self) -> int:
        return self.item.get_expiry()

    @property
    def field(self) -> str:
        """This policy in RateLimit-Policy."""
        return f'"{self.name}";q={self.item.amount};w={self.window}'

    @property
    def block(self) -> int:
        """Requests one reservation of the local allowance takes (allowance.py)."""
        return block_size(self.item.amount)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    policy: Policy  # the one to report: the refusing one, else the tightest
    remaining: int
    reset_at: float  # epoch seconds

    def reset_in(self) -> int:
        # Whole seconds, rounded up and at least 1: a client that waits that long
        # finds room again.
        return max(1, math.ceil(self.reset_at - time.time()))


class RateLimit:
    """Pure ASGI middleware: ``app.add_middleware(RateLimit, settings=settings)``.

    POST /tasks and POST /tasks/batch (one request, however many tasks) count
    against ``rate_limit_submit``; GET /tasks, GET/DELETE /tasks/... (the event
    stream too) against ``rate_limit_read``; every other path (/health, /metrics, /docs, /openapi.json,
    /dashboard) is not limited. It closes its Redis connections when the app's
    lifespan ends (or call :meth:`aclose`).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        *,
        key_prefix: str = "taskman:ratelimit",
        on_limited: Callable[[str], None] | None = None,
        warn_every: float = 60.0,
    ) -> None:
        if not settings.redis_configured:
            raise ValueError(
                "rate limiting needs Redis: set TASKMAN_REDIS_URL or "
                "TASKMAN_REDIS_SENTINELS"
            )
        self.app = app
        self.fail_closed = settings.rate_limit_fail_mode == "closed"
        self.on_limited = on_limited
        self.warn_every = warn_every
        self._clients = ClientKeys(settings.trusted_proxies, MEMO_SIZE)
        self.policies: dict[Kind, list[Policy]] = {
            "submit": _policies("submit", parse_limits(settings.rate_limit_submit)),
            "read": _policies("read", parse_limits(settings.rate_limit_read)),
        }
        # Phase 2's client rather than limits' default one: redis-py retries a
        # refused connection 3 times with up to 10 s of backoff, and a rate limiter
        # must fail fast; and the checks of concurrent requests share pipelines.
        self._redis = connect_async(
            settings,
            timeout=REDIS_TIMEOUT_SECONDS,
            connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        self._batch = AutoPipeline(self._redis)
        self._pool = self._redis.connection_pool
        options: dict[str, Any] = {"connection_pool": self._pool}
        storage = RedisStorage(
            # Given a pool, limits reads only the URI's scheme: the pool says
            # where Redis is (with sentinels, wherever the primary is now).
            storage_uri(settings.redis_url or "redis://"),
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix=key_prefix,
            **options,
        )
        self.limiter = STRATEGIES[settings.rate_limit_strategy](storage)
        self._storage = storage
        self._allowances = Allowances(self._redis, self._batch)
        # Memos of what is the same for every request of a client.
        self._fields: dict[tuple[str, ...], str] = {}
        self._keys: dict[tuple[str, str, str], str] = {}
        self._down_until = 0.0
        self._last_warning = -math.inf
        self._unwarned_failures = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_on_shutdown(send))
            return
        kind = _kind(scope) if scope["type"] == "http" else None
        policies = self.policies[kind] if kind else []
        if kind is None or not policies:
            await self.app(scope, receive, send)
            return
        try:
            verdict = await self.check(kind, policies, self.client_key(scope))
        except STORAGE_ERRORS as error:
            moment = time.monotonic()
            # Only a real failure starts the pause: the pause's own refusals
            # extending it, a limiter under steady load never asked Redis again.
            if moment >= self._down_until:
                self._down_until = moment + REDIS_BACKOFF_SECONDS
            self._warn(error)
            if self.fail_closed:
                await _json(
                    scope,
                    receive,
                    send,
                    503,
                    "rate limiter unavailable; try again shortly",
                    [("Retry-After", "1")],
                )
                return
            await self.app(scope, receive, send)
            return
        headers = self.headers(policies, verdict)
        if not verdict.allowed:
            if self.on_limited is not None:
                self.on_limited(kind)
            detail = f"rate limit exceeded: {verdict.policy.item}"
            retry_after = ("Retry-After", str(verdict.reset_in()))
            await _json(scope, receive, send, 429, detail, [*headers, retry_after])
            return

        raw = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def check(
        self, kind: Kind, policies: Sequence[Policy], client: str
    ) -> Verdict:
        """Count one request of ``client`` against every policy of ``kind``."""
        if time.monotonic() < self._down_until:
            raise StorageError(ConnectionError("it failed less than a second ago"))
        if isinstance(self.limiter, MovingWindowRateLimiter):
            try:
                return await self._check_moving_window(kind, policies, client)
            except NoScriptError:
                pass  # a (re)started Redis: the path below loads the scripts
        # Shortest window first, stopping at the first refusal: a request refused
        # by the per-second limit then costs nothing of the per-minute one. Each hit
        # is one atomic Lua script, so concurrent requests cannot overshoot.
        for policy in policies:
            if not await self.limiter.hit(policy.item, kind, client):
                stats = await self.limiter.get_window_stats(policy.item, kind, client)
                return Verdict(False, policy, 0, stats.reset_time)
        all_stats = await asyncio.gather(
            *(self.limiter.get_window_stats(p.item, kind, client) for p in policies)
        )
        # Report the most restrictive: the least remaining, then the longest wait.
        stats, policy = min(
            zip(all_stats, policies, strict=True),
            key=lambda pair: (pair[0].remaining, -pair[0].reset_time),
        )
        return Verdict(True, policy, max(0, stats.remaining), stats.reset_time)

    async def _check_moving_window(
        self, kind: Kind, policies: Sequence[Policy], client: str
    ) -> Verdict:
        """The default strategy in one round trip instead of two per policy.

        These are limits' own two Lua scripts (take an entry if the window has
        room; read the window), for every policy, in one pipeline, shared with the
        checks of other requests in the same loop turn. Each script is atomic, so
        the limit stays exact; the price is that when a short window refuses, the
        longer windows have still counted the request.
        """
        scripts: Any = self._storage.bridge  # limits' redis-py bridge ("redispy")
        acquire, window = scripts.lua_acquire_moving_window, scripts.lua_moving_window
        now = time.time()
        if any(policy.block > 1 for policy in policies):
            return await self._spend_allowances(kind, policies, client)
        commands: list[tuple[Any, ...]] = []
        for policy in policies:
            key = scripts.prefixed_key(policy.item.key_for(kind, client))
            amount, expiry = policy.item.amount, policy.window
            commands.append(("EVALSHA", acquire.sha, 1, key, now, amount, expiry, 1))
            commands.append(("EVALSHA", window.sha, 1, key, now - expiry, amount))
        results = await self._batch.execute_commands(*commands)
        verdicts = []
        for index, policy in enumerate(policies):
            acquired, entries = results[2 * index], results[2 * index + 1]
            start, count = (float(entries[0]), int(entries[1])) if entries else (now, 0)
            reset_at = start + policy.window
            if not acquired:
                return Verdict(False, policy, 0, reset_at)
            verdicts.append(
                Verdict(True, policy, max(0, policy.item.amount - count), reset_at)
            )
        # Report the most restrictive: the least remaining, then the longest wait.
        return min(verdicts, key=lambda v: (v.remaining, -v.reset_at))

    async def _spend_allowances(
        self, kind: Kind, policies: Sequence[Policy], client: str
    ) -> Verdict:
        """A limit large enough for blocks: counted in this process's allowance,
        Redis asked once a block (allowance.py states what that costs); shortest
        window first, stopping at the first refusal."""
        scripts: Any = self._storage.bridge
        verdicts = []
        for policy in policies:
            key = self._keys.get((policy.name, kind, client))
            if key is None:
                if len(self._keys) >= MEMO_SIZE:
                    self._keys.clear()
                key = scripts.prefixed_key(policy.item.key_for(kind, client))
                self._keys[policy.name, kind, client] = key
            spent = await self._allowances.spend(
                key,
                policy.item.amount,
                policy.window,
                policy.block,
                scripts.lua_moving_window,
            )
            if not spent.allowed:
                return Verdict(False, policy, 0, spent.reset_at)
            verdicts.append(Verdict(True, policy, spent.remaining, spent.reset_at))
        return min(verdicts, key=lambda v: (v.remaining, -v.reset_at))

    def headers(
        self, policies: Sequence[Policy], verdict: Verdict
    ) -> list[tuple[str, str]]:
        """RateLimit fields of draft-ietf-httpapi-ratelimit-headers-08 (structured
        fields; a quoted policy name with q/w, and r/t for the one reported), plus
        the legacy X-RateLimit-* trio most clients still read (Reset in epoch
        seconds, as GitHub and Flask-Limiter send it)."""
        reset_in = verdict.reset_in()
        policy = verdict.policy
        return [
            (
                "RateLimit-Policy",
                self._policy_field(policies),
            ),
            ("RateLimit", f'"{policy.name}";r={verdict.remaining};t={reset_in}'),
            ("X-RateLimit-Limit", str(policy.item.amount)),
            ("X-RateLimit-Remaining", str(verdict.remaining)),
            ("X-RateLimit-Reset", str(math.ceil(verdict.reset_at))),
        ]

    def _policy_field(self, policies: Sequence[Policy]) -> str:
        # Per request it is always one of two lists: built once each.
        key = tuple(policy.name for policy in policies)
        field = self._fields.get(key)
        if field is None:
            field = self._fields[key] = ", ".join(p.field for p in policies)
        return field

    def client_key(self, scope: Scope) -> str:
        """Who is asking (client_keys.py): the key its counts are kept under."""
        return self._clients.of(scope)

    def _warn(self, error: BaseException) -> None:
        # One line per warn_every seconds, not one per request: Redis being down
        # during a burst would otherwise flood the log.
        self._unwarned_failures += 1
        now = time.monotonic()
        if now - self._last_warning < self.warn_every:
            return
        log.warning(
            "rate limiting is off: Redis is unreachable (%s); %s requests "
            "(fail-%s; %d request(s) since the last warning)",
            error,
            "refusing" if self.fail_closed else "letting through",
            "closed" if self.fail_closed else "open",
            self._unwarned_failures,
        )
        self._last_warning = now
        self._unwarned_failures = 0

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] in (
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
            ):
                await self.aclose()
            await send(message)

        return closing_send

    async def aclose(self) -> None:
        """Close the Redis connections (they belong to the running event loop)."""
        await self._batch.aclose()
        await self._pool.aclose()


def _policies(kind: Kind, items: list[RateLimitItem]) -> list[Policy]:
    items = sorted(items, key=lambda item: item.get_expiry())
    names = [f"{kind}-{item.get_expiry()}s" for item in items]
    # Two limits over the same window would share a name; the draft wants each
    # policy named once.
    return [
        Policy(name if names.count(name) == 1 else f"{name}-{i}", item)
        for i, (name, item) in enumerate(zip(names, items, strict=True))
    ]


# A batch is one submit request, whatever its size (its tasks are bounded).
SUBMIT_PATHS = ("/tasks", "/tasks/batch")


def _kind(scope: Scope) -> Kind | None:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path.rstrip("/") in SUBMIT_PATHS and scope["method"] == "POST":
        return "submit"
    if path == "/tasks" or path.startswith("/tasks/"):
        return "read"
    return None


async def _json(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: list[tuple[str, str]],
) -> None:
    response = JSONResponse(
        {"detail": detail}, status_code=status, headers=dict(headers)
    )
    await response(scope, receive, send)
