"""Docker can't run here, so check what can be checked: compose.yaml parses, and every
command it (and the Dockerfile) runs is a valid ``taskman`` command line."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from common.settings import Settings
from taskman.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def parses(argv: list[str]) -> None:
    """Fail unless click would accept ``argv`` as a taskman command line."""
    assert argv[0] == "taskman", argv
    group: Any = typer.main.get_command(app)  # typer 0.2x vendors its own click
    name, *rest = argv[1:]
    assert name in group.commands, f"no command {name!r}"
    group.commands[name].make_context(name, list(rest))  # raises on a bad option


def commands() -> list[list[str]]:
    found = [
        service["command"]
        for service in COMPOSE["services"].values()
        if isinstance(service.get("command"), list)
        and service["command"][0] == "taskman"
    ]
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd, "the Dockerfile has a CMD"
    found.append(json.loads(cmd[1]))
    return found


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[1:3]))
def test_every_command_of_the_stack_exists_in_the_cli(argv: list[str]) -> None:
    parses(argv)


def test_an_unknown_option_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option"):
        parses(["taskman", "serve", "--no-such-option"])


def test_the_stack_runs_an_api_workers_and_a_durable_redis() -> None:
    services: dict[str, Any] = COMPOSE["services"]
    assert set(services) == {"redis", "api", "worker"}
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert "--requirepass" in redis_command
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["api"]["environment"]["TASKMAN_DASHBOARD_PASSWORD"].startswith(
        "${TASKMAN_DASHBOARD_PASSWORD:?"
    ), "no dashboard without a password"


def test_every_setting_the_stack_sets_is_a_real_setting() -> None:
    fields = {f"TASKMAN_{name.upper()}" for name in Settings.model_fields}
    for service in COMPOSE["services"].values():
        environment = service.get("environment") or {}
        names = {name for name in environment if name.startswith("TASKMAN_")}
        assert names <= fields, names - fields
