"""AutoPipeline, against a real Redis: batching must not change any caller's reply."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.settings import Settings
from phase3_production.autopipeline import AutoPipeline
from phase3_production.redis_client import connect_async
from taskman.redis_server import EmbeddedRedis, free_port


@asynccontextmanager
async def auto_pipeline(url: str) -> AsyncIterator[AutoPipeline]:
    client = connect_async(Settings(redis_url=url))
    batch = AutoPipeline(client)
    try:
        yield batch
    finally:
        await batch.aclose()
        await client.aclose()


def connections_received(url: str) -> int:
    stats: Any = redis.Redis.from_url(url).info("stats")
    return int(stats["total_connections_received"])


async def in_one_turn(url: str, count: int) -> list[Any]:
    async with auto_pipeline(url) as batch:
        return await asyncio.gather(
            *(batch.execute_command("ECHO", f"reply {i}") for i in range(count))
        )


def test_commands_of_one_loop_turn_share_a_connection_and_keep_their_replies(
    tmp_path: Path,
) -> None:
    with EmbeddedRedis(tmp_path) as redis_url:  # no other client may connect
        before = connections_received(redis_url)
        replies = asyncio.run(in_one_turn(redis_url, 200))
        # 200 commands in flight at once, one connection: they went as one
        # pipeline. (The other one is connections_received's own.)
        assert connections_received(redis_url) - before == 2
    assert replies == [f"reply {i}".encode() for i in range(200)]


def test_an_error_reply_fails_its_own_caller_only(redis_url: str) -> None:
    async def main() -> list[Any]:
        async with auto_pipeline(redis_url) as batch:
            return await asyncio.gather(
                batch.execute_command("SET", "autopipeline:text", "x"),
                batch.execute_command("INCR", "autopipeline:text"),  # not a number
                batch.execute_command("GET", "autopipeline:text"),
                return_exceptions=True,
            )

    stored, failed, read = asyncio.run(main())
    assert stored is True
    assert isinstance(failed, ResponseError)
    assert read == b"x"


def test_redis_unreachable_fails_every_caller_at_once() -> None:
    async def main() -> list[Any]:
        nobody = f"redis://127.0.0.1:{free_port()}/0"
        async with auto_pipeline(nobody) as batch:
            return await asyncio.wait_for(
                asyncio.gather(
                    *(batch.execute_command("PING") for _ in range(5)),
                    return_exceptions=True,
                ),
                timeout=10,
            )

    outcomes = asyncio.run(main())
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes


def test_a_caller_that_goes_away_does_not_disturb_the_others(redis_url: str) -> None:
    async def main() -> tuple[Any, bool]:
        async with auto_pipeline(redis_url) as batch:
            leaving = asyncio.ensure_future(batch.execute_command("ECHO", "gone"))
            staying = asyncio.ensure_future(batch.execute_command("ECHO", "here"))
            await asyncio.sleep(0)  # both queued, not yet sent
            leaving.cancel()
            return await staying, leaving.cancelled()

    assert asyncio.run(main()) == (b"here", True)


@pytest.mark.parametrize("count", [1, 3])
def test_execute_commands_answers_in_order(redis_url: str, count: int) -> None:
    async def main() -> list[Any]:
        async with auto_pipeline(redis_url) as batch:
            return await batch.execute_commands(
                *(("ECHO", str(i)) for i in range(count))
            )

    assert asyncio.run(main()) == [str(i).encode() for i in range(count)]


def test_replies_are_parsed_as_redis_py_parses_them(redis_url: str) -> None:
    async def main() -> list[Any]:
        async with auto_pipeline(redis_url) as batch:
            await batch.execute_command("HSET", "autopipeline:hash", "a", "1")
            return await batch.execute_commands(
                ("HGETALL", "autopipeline:hash"), ("ZSCORE", "autopipeline:no", "x")
            )

    assert asyncio.run(main()) == [{b"a": b"1"}, None]


def test_a_connection_killed_between_batches_is_replaced_at_once(
    redis_url: str,
) -> None:
    """The kept connection goes stale (Redis restarted, a failover, an idle
    timeout): the next batch is sent again on a fresh one, not failed."""

    async def main() -> tuple[int, int, bytes]:
        async with auto_pipeline(redis_url) as batch:
            first = await batch.execute_command("CLIENT", "ID")
            redis.Redis.from_url(redis_url).execute_command(
                "CLIENT", "KILL", "ID", first
            )
            again = await batch.execute_command("ECHO", "again")
            second = await batch.execute_command("CLIENT", "ID")
            return first, second, again

    first, second, again = asyncio.run(main())
    assert again == b"again" and second != first
