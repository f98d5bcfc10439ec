"""Settings from the environment (``TASKMAN_*``) or a ``.env`` file.

Every field has a default so that ``taskman serve --phase 1`` works with no set-up;
each phase ignores the fields it does not use.
"""

import os
import random
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cpu_workers() -> int:
    # Leave one core to the event loop: a pool as large as the machine starves it
    # (see docs/phase1.md for the measurement).
    return max(1, (os.cpu_count() or 2) - 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TASKMAN_", env_file=".env", extra="ignore"
    )

    # --- every phase
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_retries: int = Field(default=3, ge=0, le=10)
    # Seconds to wait before retry 1, 2, 3...; the last value repeats.
    retry_backoff: Annotated[list[float], NoDecode] = [1.0, 2.0, 4.0]
    # Each delay is stretched by up to this fraction, so that retries of tasks that
    # failed together do not all come back at the same instant.
    retry_jitter: float = Field(default=0.1, ge=0, le=1)
    max_body_bytes: int = Field(default=65536, ge=1024)
    # The request line and headers together (431 above it), and the seconds a
    # client has to send them (408); see docs/contract.md, "Limits".
    max_header_bytes: int = Field(default=32768, ge=1024)
    header_timeout: float = Field(default=10.0, gt=0)
    # Open connections served at once; one more is answered 503 and closed.
    max_connections: int = Field(default=1000, ge=1)
    idempotency_ttl: int = Field(default=24 * 3600, ge=1)
    # How long a finished task stays readable (phase 1 memory, RQ's result_ttl).
    retention_seconds: int = Field(default=3600, ge=1)

    # --- phase 1: the in-process event bus
    max_queued: int = Field(default=10_000, ge=1)
    io_concurrency: int = Field(default=64, ge=1)
    cpu_workers: int = Field(default_factory=_default_cpu_workers, ge=1)
    shutdown_timeout: float = Field(default=10.0, ge=0)

    # --- phases 2 and 3: Redis and RQ
    redis_url: str | None = None
    # Redis Sentinel: "host:port,host:port,..." and the service's name. When set,
    # every client asks the sentinels where the primary is (and again after a
    # failover); TASKMAN_REDIS_URL then gives only the user, password, database
    # and TLS options, for the primary and the sentinels alike.
    redis_sentinels: Annotated[list[str], NoDecode] = []
    redis_sentinel_master: str | None = None
    # POST answers 202 only once this many replicas hold the task (Redis WAIT),
    # waiting at most redis_wait_timeout seconds; else 503 (phase2_queue/replicas.py).
    redis_min_replicas: int = Field(default=0, ge=0, le=16)
    redis_wait_timeout: float = Field(default=1.0, gt=0, le=4)
    queue_name: str = "taskman"
    data_dir: Path = Path(".taskman")
    # A worker SIGKILLed mid-task is noticed after this many seconds without a
    # heartbeat; RQ's own default is 90 s (plus up to 600 s for maintenance).
    job_heartbeat_seconds: int = Field(default=10, ge=2)

    # --- phase 3: production
    rate_limit_submit: str = "20/second;600/minute"
    rate_limit_read: str = "100/second"
    rate_limit_strategy: Literal[
        "moving-window", "fixed-window", "sliding-window-counter"
    ] = "moving-window"
    rate_limit_fail_mode: Literal["open", "closed"] = "open"
    trusted_proxies: Annotated[list[str], NoDecode] = []
    dashboard_username: str = "admin"
    dashboard_password: str | None = None
    result_cache_ttl: int = Field(default=300, ge=0)

    @field_validator("retry_backoff", mode="before")
    @classmethod
    def _split_floats(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies", "redis_sentinels", mode="before")
    @classmethod
    def _split_strings(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("retry_backoff")
    @classmethod
    def _not_empty(cls, value: list[float]) -> list[float]:
        if not value or any(delay < 0 for delay in value):
            raise ValueError("give one or more delays in seconds, each >= 0")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r}: give each sentinel as host:port")
        return value

    @model_validator(mode="after")
    def _sentinels_and_master(self) -> "Settings":
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError(
                "set TASKMAN_REDIS_SENTINELS and TASKMAN_REDIS_SENTINEL_MASTER "
                "together (the sentinels, and the name of the primary they watch)"
            )
        return self

    @property
    def redis_configured(self) -> bool:
        """Whether Redis is named at all: a URL, or sentinels to ask."""
        return bool(self.redis_url or self.redis_sentinels)

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = self.retry_backoff[min(attempt, len(self.retry_backoff)) - 1]
        return base * (1 + random.uniform(0, self.retry_jitter))
