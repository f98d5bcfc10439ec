"""The docs cannot rot: every code block, command, link and repo path in README.md and
docs/*.md is exercised.

Driven by the markdown, not by a list of today's commands: a page or a block added
later is covered as soon as it is written, and a command this file does not know
fails until someone decides how to check it (see ``kind`` and ``validate``).

- ```sh lines: ``curl`` to :8000, ``taskman submit|status``, ``diff`` and ``rq info``
  RUN for real, against one phase-3 ``taskman serve`` started for this module; other
  ``taskman`` commands go through the CLI's parser; ``make`` targets and variables
  are checked against the Makefile (and the ``taskman`` line a target runs is
  parsed); ``export``, ``docker``, ``openssl`` are validated only.
- ```python compiles (and runs when self-contained; ``>>>`` blocks are doctests);
  ```text log lines must be messages the code can log, and a repository tree must
  name real files; ```toml/```yaml/```json parse.
- Relative links (and their #anchors) resolve; repo paths named in prose exist;
  ``taskman``/``make``/``diff`` commands quoted inline are valid.
"""

import ast
import doctest
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import typer
import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token

from common.settings import Settings
from taskman.cli import app
from taskman.redis_server import free_port
from tests.processes import BIN, stop, taskman, wait_http

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKDOWN = MarkdownIt("commonmark").enable("table")
# Not the repository's own files: never searched for paths or log messages.
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "node_modules", "__pycache__"}


class DocError(AssertionError):
    """What a doc says that is not true (any more)."""


def problem(where: str, what: str, command: str | None = None) -> DocError:
    return DocError(f"{where}: {what}" + (f"\n    {command}" if command else ""))


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def tokens(page: Path) -> list[Token]:
    return _parse(page.read_text(encoding="utf-8"))


@cache
def _parse(markdown: str) -> list[Token]:
    return MARKDOWN.parse(markdown)


# --- code blocks --------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: Path
    first: int  # the line of the block's first line of content, 1-based
    lang: str
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.first - 1}"


def blocks(page: Path) -> list[Block]:
    found = []
    for token in tokens(page):
        if token.type == "fence" and token.map:
            info = token.info.strip()
            lang = info.split()[0].lower() if info else ""
            found.append(Block(page, token.map[0] + 2, lang, info, token.content))
        elif token.type == "code_block" and token.map:  # indented: no tag
            found.append(Block(page, token.map[0] + 1, "", "", token.content))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
SHELL = {"sh", "bash", "shell", "console"}


# --- shell lines --------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str  # continuation lines joined, comment stripped

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def strip_comment(line: str) -> str:
    """``line`` without its ``# comment`` (a ``#`` that starts a word, out of quotes)."""
    quote: str | None = None
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block: Block) -> list[Command]:
    """The command lines of a shell block (```console: the ``$ `` lines only)."""
    found: list[Command] = []
    parts: list[str] = []
    start = 0
    for offset, raw in enumerate(block.text.splitlines()):
        if block.lang == "console" and not parts:
            if not raw.lstrip().startswith("$ "):
                continue  # output
            raw = raw.lstrip()[2:]
        if not parts:
            start = block.first + offset
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1].strip())
            continue
        parts.append(raw.strip())
        text = strip_comment(" ".join(parts)).strip()
        parts = []
        if text:
            found.append(Command(block.page, start, text))
    return found


ALL_COMMANDS = [c for b in ALL_BLOCKS if b.lang in SHELL for c in commands(b)]

SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
OPERATORS = {"|", "||", "&&", ";", "&"}
# <id>, <task-id>: a placeholder, not a redirection; run, it is the last task's id.
ANGLE = re.compile(r"<[A-Za-z][\w-]*>")
REDIRECTION = re.compile(r"&?[<>]+&?")  # shlex splits 2>&1 as 2, >&, 1
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


@dataclass
class Segment:
    """One simple command of a line: what joins it to the previous one, its
    environment assignments, its argv."""

    op: str
    env: dict[str, str]
    argv: list[str]


def segments(text: str) -> tuple[list[Segment], list[str]]:
    """The simple commands of a line, and the ``$(...)`` commands inside it."""
    inner = SUBSTITUTION.findall(text)
    text = ANGLE.sub("PLACEHOLDER", SUBSTITUTION.sub("SUBST", text))
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    found: list[Segment] = []
    op, words = "", []
    for word in [*lexer, ";"]:
        if word not in OPERATORS:
            words.append(word)
            continue
        env = {}
        while words and ASSIGNMENT.match(words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if env or words:
            found.append(Segment(op, env, words))
        op, words = word, []
    return found, inner


# What the docs may run, and how each is checked. A command not here fails: add it
# deliberately, with a check.
RUN = {"curl", "taskman-run", "diff", "rq-info"}
FILTERS = {"grep", "head", "tail", "jq", "wc", "sort", "uniq", "cut"}


def kind(argv: list[str]) -> str:
    name = argv[0]
    bare = name.removeprefix(".venv/bin/")
    if name == "curl":
        return "curl"
    if bare == "taskman":
        return "taskman-run" if argv[1:2] in (["submit"], ["status"]) else "taskman"
    if bare == "rq":
        return "rq-info" if argv[1:2] == ["info"] else "rq"
    if name in ("make", "diff", "export", "docker", "openssl"):
        return name
    if name in FILTERS:
        return "filter"
    return "unknown"


# --- validating (not running) a command ----------------------------------------------


@cache
def cli() -> Any:
    return typer.main.get_command(app)  # typer 0.2x vendors its own click


def parses(argv: list[str]) -> str | None:
    """Why click would refuse ``argv`` as a taskman command line, or None."""
    if len(argv) < 2:
        return "no taskman command given"
    name, *rest = argv[1:]
    group = cli()
    if name not in group.commands:
        return f"taskman has no command {name!r} (it has {', '.join(group.commands)})"
    try:
        group.commands[name].make_context(name, list(rest))
    except Exception as error:
        format_message = getattr(error, "format_message", None)
        message = format_message() if format_message else str(error)
        return f"taskman {name}: {message}"
    return None


@cache
def known_settings() -> set[str]:
    """Every TASKMAN_* variable something reads: Settings and the CLI's envvars."""
    names = {f"TASKMAN_{name.upper()}" for name in Settings.model_fields}
    for command in cli().commands.values():
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
            names.update(str(envvar) for envvar in envvars if envvar)
    return names


def repo_files() -> Iterator[Path]:
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        yield path


@cache
def repo_names() -> frozenset[str]:
    return frozenset(path.name for path in repo_files())


@cache
def python_sources() -> dict[Path, str]:
    return {
        path: path.read_text(encoding="utf-8")
        for path in repo_files()
        if path.suffix == ".py" and path.is_file()
    }


def known_variable(name: str) -> bool:
    """A TASKMAN_* variable must be a real setting; another one must be used by the
    deployment files or the code."""
    if name.startswith("TASKMAN_"):
        return name in known_settings()
    texts = [
        (ROOT / f).read_text()
        for f in ("compose.yaml", "compose.yml", "Dockerfile", "Makefile")
        if (ROOT / f).exists()
    ]
    texts.extend(python_sources().values())
    return any(re.search(rf"\b{re.escape(name)}\b", text) for text in texts)


@dataclass
class Makefile:
    variables: dict[str, str]
    rules: dict[str, tuple[list[str], list[str], set[str]]]  # prereqs, recipe, refs
    default: str | None


VARIABLE_REF = re.compile(r"\$[({]([A-Za-z_]\w*)[)}]")


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        text = VARIABLE_REF.sub(lambda m: variables.get(m[1], ""), text)
    return text


@cache
def makefile() -> Makefile:
    variables: dict[str, str] = {}
    rules: dict[str, tuple[list[str], list[str], set[str]]] = {}
    default: str | None = None
    current: list[str] = []
    for raw in (ROOT / "Makefile").read_text().splitlines():
        if raw.startswith("\t"):
            for target in current:
                rules[target][1].append(raw[1:])
            continue
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if m := re.match(
            r"^(?:override\s+|export\s+)?([A-Za-z_][\w.]*)\s*[?:+!]?=\s*(.*)$", line
        ):
            variables[m[1]] = m[2]
            current = []
        elif m := re.match(r"^([^:#=]+?)\s*::?\s*([^=].*|)$", line):
            prereqs, _, inline = m[2].partition(";")
            current = expand(m[1], variables).split()
            for target in current:
                rule = rules.setdefault(target, ([], [], set()))
                rule[0].extend(expand(prereqs, variables).split())
                rule[2].update(VARIABLE_REF.findall(line))
                if inline.strip():
                    rule[1].append(inline.strip())
            if default is None and not current[0].startswith("."):
                default = current[0]
    return Makefile(variables, rules, default)


def make_closure(target: str) -> list[str]:
    """``target`` and every rule it depends on."""
    rules = makefile().rules
    seen: list[str] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in rules:
            continue
        seen.append(name)
        todo.extend(rules[name][0])
    return seen


def make_variables_used(target: str) -> set[str]:
    mk = makefile()
    used: set[str] = set()
    for name in make_closure(target):
        _, recipe, refs = mk.rules[name]
        used |= refs
        for line in recipe:
            used.update(VARIABLE_REF.findall(line))
    todo = list(used)
    while todo:
        for ref in VARIABLE_REF.findall(mk.variables.get(todo.pop(), "")):
            if ref not in used:
                used.add(ref)
                todo.append(ref)
    return used


def check_make(where: str, segment: Segment, text: str) -> None:
    mk = makefile()
    targets, assigned = [], {}
    for word in segment.argv[1:]:
        if m := ASSIGNMENT.match(word):
            assigned[m[1]] = m[2]
        elif not word.startswith("-"):
            targets.append(word)
    if not targets and mk.default:
        targets = [mk.default]
    for target in targets:
        if target not in mk.rules:
            raise problem(where, f"the Makefile has no target {target!r}", text)
    used = set().union(*(make_variables_used(t) for t in targets))
    for name in assigned:
        if name not in used:
            raise problem(where, f"make {' '.join(targets)} does not use {name}", text)
    for name in segment.env:
        if name.startswith("TASKMAN_"):
            if not known_variable(name):
                raise problem(where, f"{name} is not a taskman setting", text)
        elif name not in used:
            raise problem(where, f"make {' '.join(targets)} does not use {name}", text)
    # What the target would run, with these variables: a taskman line must parse.
    values = {**mk.variables, **segment.env, **assigned}
    for target in targets:
        for name in make_closure(target):
            for line in mk.rules[name][1]:
                argv = shlex.split(expand(line, values).lstrip("@-+ "))
                is_taskman = bool(argv) and Path(argv[0]).name == "taskman"
                if is_taskman and (error := parses(["taskman", *argv[1:]])):
                    raise problem(where, f"make {target} would run: {error}", text)


COMPOSE_COMMANDS = {"up", "down", "build", "logs", "ps", "restart", "stop", "start"}
COMPOSE_COMMANDS |= {"pull", "kill", "rm", "create", "config", "top", "exec", "run"}
COMPOSE_OPTIONS_WITH_A_VALUE = {"-p", "--project-name", "--profile", "--env-file"}
COMPOSE_OPTIONS_WITH_A_VALUE |= {"-t", "--timeout"}


def check_docker(where: str, argv: list[str], text: str) -> None:
    args = argv[1:]
    if args[:1] == ["build"]:
        if not (ROOT / "Dockerfile").exists():
            raise problem(where, "there is no Dockerfile", text)
        return
    if args[:1] != ["compose"]:
        raise problem(
            where, f"docker {' '.join(args[:1])}: not a command this test knows", text
        )
    files, positional, scales = [], [], []
    words = iter(args[1:])
    for word in words:
        if word in ("-f", "--file"):
            files.append(next(words, ""))
        elif word == "--scale":
            scales.append(next(words, ""))
        elif word.startswith("--scale="):
            scales.append(word.split("=", 1)[1])
        elif word in COMPOSE_OPTIONS_WITH_A_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            positional.append(word)
    candidates = files or ["compose.yaml", "compose.yml", "docker-compose.yml"]
    existing = [ROOT / f for f in candidates if (ROOT / f).exists()]
    if not existing:
        raise problem(where, f"no compose file ({', '.join(candidates)})", text)
    services = set((yaml.safe_load(existing[0].read_text()) or {}).get("services", {}))
    subcommand, *names = positional or ["up"]
    if subcommand in ("exec", "run"):
        names = names[:1]
    elif subcommand not in COMPOSE_COMMANDS:
        raise problem(
            where, f"docker compose {subcommand}: not a command this test knows", text
        )
    if subcommand in ("down", "config"):
        names = []
    for scale in scales:
        name, _, count = scale.partition("=")
        if not count.isdigit():
            raise problem(where, f"--scale {scale}: not SERVICE=N", text)
        names.append(name)
    for name in names:
        if name not in services:
            raise problem(
                where,
                f"{rel(existing[0])} has no service {name!r} ({', '.join(sorted(services))})",
                text,
            )


def validate(where: str, segment: Segment, text: str) -> None:
    """Check a command that is not run: it must be one this test knows, and valid."""
    for name in segment.env:
        if not known_variable(name) and kind(segment.argv or ["export"]) != "make":
            raise problem(
                where, f"{name} is neither a taskman setting nor used anywhere", text
            )
    if not segment.argv:
        raise problem(
            where, "a bare variable assignment: the test does not know it", text
        )
    argv = segment.argv
    found = kind(argv)
    if found in ("taskman", "taskman-run"):
        if error := parses(["taskman", *argv[1:]]):
            raise problem(where, error, text)
    elif found == "make":
        check_make(where, segment, text)
    elif found in ("rq", "rq-info"):
        if argv[0].startswith(".venv/") and not (BIN / Path(argv[0]).name).exists():
            raise problem(where, f"{argv[0]} is not installed in the venv", text)
    elif found == "diff":
        for name in argv[1:]:
            if not name.startswith("-") and not (ROOT / name).exists():
                raise problem(where, f"diff: {name} does not exist", text)
    elif found == "export":
        for word in argv[1:]:
            name = word.split("=", 1)[0]
            if not known_variable(name):
                raise problem(
                    where,
                    f"export {name}: neither a taskman setting nor used anywhere",
                    text,
                )
    elif found == "docker":
        check_docker(where, argv, text)
    elif found == "openssl":
        if argv[1:2] != ["rand"]:
            raise problem(
                where,
                f"openssl {' '.join(argv[1:2])}: not a command this test knows",
                text,
            )
    else:  # a filter is fine only after a |
        raise problem(
            where,
            f"the docs use a command this test does not know ({argv[0]!r}): teach "
            "tests/test_docs.py how to run or validate it",
            text,
        )


# --- running a command against a real server -----------------------------------------


@dataclass
class Server:
    base: str
    redis_url: str
    env: dict[str, str]
    log: Path
    tmp: Path
    task_ids: list[str] = field(default_factory=list)
    runs: int = 0

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One phase-3 ``taskman serve`` (its own Redis, one worker) that stands in for
    the docs' ``localhost:8000``."""
    tmp = tmp_path_factory.mktemp("docs")
    port = free_port()
    log = tmp / "serve.log"
    password = "docs-test-password"
    server = taskman(
        *("serve", "--phase", "3", "--port", str(port), "--workers", "1"),
        env={
            "TASKMAN_DATA_DIR": str(tmp / "data"),
            "TASKMAN_REDIS_URL": "",
            "TASKMAN_DASHBOARD_PASSWORD": password,
            "TASKMAN_RETRY_BACKOFF": "0",  # a doc's flaky task needs no real waits
        },
        log=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=30, process=server)
        found = re.search(r"embedded Redis at (\S+)", log.read_text())
        assert found, f"no Redis URL in the serve log:\n{log.read_text()}"
        env = {
            **os.environ,
            "TASKMAN_URL": base,
            "TASKMAN_DASHBOARD_PASSWORD": password,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        yield Server(base, found[1], env, log, tmp)
    finally:
        stop(server, timeout=30)


VENV_BIN = re.compile(r"(?<![\w./-])\.venv/bin/")
LOCAL = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000\b")


def aim(command: Command, argv: list[str], server: Server) -> tuple[str, Path]:
    """The command line, aimed at the test server; where curl dumps its headers."""
    where, text = command.where, command.text
    found = kind(argv)
    script = LOCAL.sub(server.base, VENV_BIN.sub(f"{BIN}/", text))
    server.runs += 1
    headers = server.tmp / f"headers-{server.runs}"
    if found == "curl":
        dump = f"curl -D {shlex.quote(str(headers))}"
        script = re.sub(r"\bcurl\b", dump, script, count=1)
    elif found == "rq-info":
        url = server.redis_url
        if "redis://" in script:
            script = re.sub(r"rediss?://\S+", url, script)
        else:
            script = re.sub(r"\binfo\b", f"info --url {url}", script, count=1)
    if ANGLE.search(script):
        if not server.task_ids:
            raise problem(where, f"{ANGLE.search(script)[0]} before any submit", text)
        script = ANGLE.sub(server.task_ids[-1], script)
    return script, headers


def run(command: Command, argv: list[str], server: Server | None) -> None:
    """Run a command line of the docs for real; ``server`` is what answers for
    ``localhost:8000`` (only ``diff`` needs none)."""
    where, text = command.where, command.text
    found = kind(argv)
    script = VENV_BIN.sub(f"{BIN}/", text)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    headers, log = None, ""
    if found != "diff":
        if server is None:
            raise problem(where, "needs the test server", text)
        script, headers = aim(command, argv, server)
        env, log = server.env, f"\n--- server log\n{server.log_tail()}"
    # Each stage's exit status, so that a grep that finds nothing fails the line.
    script += '\necho "__pipestatus__ ${PIPESTATUS[*]}" >&2'
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=45,
        )
    except subprocess.TimeoutExpired:
        raise problem(where, "timed out after 45 s", text) from None
    stderr, _, codes = done.stderr.rpartition("__pipestatus__ ")
    statuses = [int(code) for code in codes.split()]
    details = (
        f"\n    ran: {script.splitlines()[0]}\n    exit statuses: {statuses}"
        f"\n--- stdout\n{done.stdout[-1500:]}\n--- stderr\n{stderr[-1500:]}"
    )
    allowed = {0, 1} if found == "diff" else {0}  # diff: 1 = the files differ
    if not statuses or statuses[0] not in allowed or any(statuses[1:]):
        raise problem(where, "failed", text + details + log)
    if found == "curl" and headers:
        answers = re.findall(r"^HTTP/\S+ (\d{3})", headers.read_text(), re.M)
        if not answers:
            raise problem(where, "no HTTP answer", text + details)
        if int(answers[-1]) >= 500:
            raise problem(where, f"answered {answers[-1]}", text + details + log)
    if server and (task_id := re.search(r'"id":\s*"([0-9a-f]{32})"', done.stdout)):
        server.task_ids.append(task_id[1])  # what a later <id> stands for


def check_command(command: Command, request: pytest.FixtureRequest | None) -> None:
    where, text = command.where, command.text
    try:
        segs, inner = segments(text)
    except ValueError as error:
        raise problem(where, f"not a shell command line ({error})", text) from None
    for sub in inner:
        sub_segs, _ = segments(sub)
        for seg in sub_segs:
            if kind(seg.argv or ["?"]) in RUN:
                raise problem(
                    where, f"$({sub}): the test runs no command substitution", text
                )
            validate(where, seg, text)
    commands_ = [
        seg
        for seg in segs
        if not (seg.op == "|" and seg.argv and kind(seg.argv) == "filter")
    ]
    if not any(seg.argv and kind(seg.argv) in RUN for seg in segs):
        for seg in commands_:
            validate(where, seg, text)
        return
    if len(commands_) != 1 or commands_[0] is not segs[0]:
        raise problem(
            where, "the test runs one command per line, piped into filters only", text
        )
    if any(REDIRECTION.fullmatch(word) for seg in segs for word in seg.argv):
        raise problem(where, "the test does not run a command with a redirection", text)
    for seg in segs:
        for name in seg.env:
            if not known_variable(name):
                raise problem(
                    where,
                    f"{name} is neither a taskman setting nor used anywhere",
                    text,
                )
    if kind(segs[0].argv) == "curl" and not LOCAL.search(text):
        raise problem(where, "curl to somewhere other than localhost:8000", text)
    if request is None:
        return
    needs_server = kind(segs[0].argv) != "diff"
    server = request.getfixturevalue("docs_server") if needs_server else None
    run(command, segs[0].argv, server)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.where)
def test_shell_command(command: Command, request: pytest.FixtureRequest) -> None:
    check_command(command, request)


# --- the other blocks ----------------------------------------------------------------

NETWORK = re.compile(
    r"\b(?:httpx|requests|urllib|socket|redis|aiohttp)\b|localhost|127\.0\.0\.1|://|\binput\("
)
HOLE = "\x00"
LOG_LINE = re.compile(r"^(?P<level>[A-Z]+):\s+\[taskman\] (?P<message>.*)$")
TREE_LINE = re.compile(r"^([A-Za-z_][\w.-]*(?:/[\w.-]+)*/)\s{2,}(.*)$")


def template(text: str) -> str:
    """A string of the code with its %-style and {}-style fields as HOLEs."""
    text = re.sub(
        r"%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[diouxXeEfFgGcrsa]", HOLE, text
    )
    text = re.sub(r"\{[^{}]*\}", HOLE, text.replace("%%", "%"))
    return text.replace("{{", "{").replace("}}", "}")


@cache
def code_strings() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Every string literal of the code (not the tests), implicit concatenation and
    f-strings included, with the regex it can log."""
    found = set()
    for path, source in python_sources().items():
        if rel(path).startswith("tests/"):
            continue
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(template(node.value))
            elif isinstance(node, ast.JoinedStr):
                found.add(
                    "".join(
                        template(part.value)
                        if isinstance(part, ast.Constant)
                        and isinstance(part.value, str)
                        else HOLE
                        for part in node.values
                    )
                )
    return tuple(
        (text, re.compile(".+?".join(re.escape(p) for p in text.split(HOLE)), re.S))
        for text in sorted(found)
        if len(text.replace(HOLE, "").strip()) >= 10
    )


def logged(message: str) -> bool:
    """Whether the code has a string that logs ``message``: a format string it fills,
    or one holding every fixed part of it in order (the doc's numbers and ``...``
    elided)."""
    strings = code_strings()
    if any(pattern.fullmatch(message) for _, pattern in strings):
        return True
    fragments = [f for f in re.split(r"\d+|\.\.\.|…", message) if f.strip()]
    for text, _ in strings:
        position = 0
        for fragment in fragments:
            position = text.find(fragment, position)
            if position < 0:
                break
            position += len(fragment)
        else:
            return True
    return False


def check_text(block: Block) -> None:
    for offset, line in enumerate(block.text.splitlines()):
        where = f"{rel(block.page)}:{block.first + offset}"
        if "[taskman]" in line:
            m = LOG_LINE.match(line.strip())
            if not m or m["level"] not in logging.getLevelNamesMapping():
                raise problem(
                    where, "a taskman log line is 'LEVEL:  [taskman] message'", line
                )
            if not logged(m["message"]):
                raise problem(
                    where,
                    "no string in the code logs this message (was it reworded?)",
                    m["message"],
                )
        elif tree := TREE_LINE.match(line):
            folder = ROOT / tree[1]
            if not folder.is_dir():
                raise problem(
                    where, f"{tree[1]} is not a folder of the repository", line
                )
            for word in tree[2].split():
                word = word.strip(",;:()")
                if re.fullmatch(r"[\w-]+\.\w+", word) and not (folder / word).exists():
                    raise problem(where, f"{tree[1]}{word} does not exist", line)


def check_python(block: Block, tmp_path: Path) -> None:
    if ">>>" in block.text:
        test = doctest.DocTestParser().get_doctest(
            block.text, {}, block.where, str(block.page), block.first - 1
        )
        output: list[str] = []
        runner = doctest.DocTestRunner(
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
        runner.run(test, out=output.append)
        if runner.failures:
            raise problem(block.where, "doctest failed\n" + "".join(output))
        return
    try:
        compile("\n" * (block.first - 1) + block.text, str(block.page), "exec")
    except SyntaxError as error:
        raise problem(
            f"{rel(block.page)}:{error.lineno}", f"python: {error.msg}"
        ) from None
    if "compile-only" in block.info.split()[1:] or NETWORK.search(block.text):
        return  # not self-contained: compiling is all we can do
    done = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode:
        raise problem(
            block.where,
            "the example fails when run (mark it ```python compile-only if it is a sketch)",
            done.stderr[-1500:],
        )


def check_block(block: Block, tmp_path: Path) -> None:
    try:
        if block.lang in ("python", "py", "python3"):
            check_python(block, tmp_path)
        elif block.lang in ("", "text", "txt", "plain"):
            check_text(block)
        elif block.lang == "toml":
            tomllib.loads(block.text)
        elif block.lang in ("yaml", "yml"):
            list(yaml.safe_load_all(block.text))
        elif block.lang == "json":
            json.loads(block.text)
        else:
            raise problem(
                block.where,
                f"a ```{block.lang} block: this test does not know how to check it",
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise problem(block.where, f"{block.lang} does not parse: {error}") from None


@pytest.mark.parametrize(
    "block",
    [b for b in ALL_BLOCKS if b.lang not in SHELL],
    ids=lambda b: f"{b.where}-{b.lang or 'untagged'}",
)
def test_code_block(block: Block, tmp_path: Path) -> None:
    check_block(block, tmp_path)


# --- prose: links, paths, inline commands ---------------------------------------------


@dataclass(frozen=True)
class Inline:
    line: int
    kind: str  # link, code or text
    content: str


def inlines(page: Path) -> list[Inline]:
    """The links, code spans and text of a page's paragraphs, lists, tables and
    headings, each with its line."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    for token in tokens(page):
        if token.type != "inline" or not token.map:
            continue
        paragraph = range(*token.map)

        def line_of(needle: str, paragraph: range = paragraph) -> int:
            first_line = needle.split("\n")[0]
            return 1 + next(
                (n for n in paragraph if first_line in lines[n]), paragraph.start
            )

        in_link = 0
        for child in token.children or []:
            if child.type == "link_open":
                href = str(child.attrs.get("href", ""))
                found.append(Inline(line_of(f"({href}"), "link", href))
                in_link += 1
            elif child.type == "link_close":
                in_link -= 1
            elif child.type == "image":
                src = str(child.attrs.get("src", ""))
                found.append(Inline(line_of(f"({src}"), "link", src))
            elif child.type == "code_inline":
                found.append(Inline(line_of(child.content), "code", child.content))
            elif child.type == "text" and not in_link:
                found.append(Inline(line_of(child.content), "text", child.content))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> frozenset[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    page_tokens = tokens(page)
    for i, token in enumerate(page_tokens):
        if token.type == "heading_open":
            children = page_tokens[i + 1].children or []
            text = "".join(
                c.content for c in children if c.type in ("text", "code_inline")
            )
            name = slug(text)
            count = seen.get(name, 0)
            found.add(name if count == 0 else f"{name}-{count}")
            seen[name] = count + 1
    text = page.read_text(encoding="utf-8")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return frozenset(found)


def check_link(page: Path, item: Inline) -> str | None:
    href = item.content
    if re.match(r"^[a-z][a-z0-9+.-]*:", href, re.I):
        return None  # http:, https:, mailto:
    path, _, anchor = href.partition("#")
    target = (page.parent / unquote(path)).resolve() if path else page
    if page.resolve().is_relative_to(ROOT) and not target.is_relative_to(ROOT):
        # Absent from a plain clone, whatever is there on this machine.
        return f"{rel(page)}:{item.line}: link to {href} leaves the repository"
    if not target.exists():
        return f"{rel(page)}:{item.line}: link to {href}: {rel(target)} does not exist"
    if anchor and target.suffix == ".md" and unquote(anchor) not in anchors(target):
        return (
            f"{rel(page)}:{item.line}: link to {href}: {rel(target)} has no heading "
            f"#{anchor} (it has: {', '.join(sorted(anchors(target)))})"
        )
    return None


FILE_PATH = re.compile(
    r"(?<![\w./:@-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|ya?ml|toml|json|txt|cfg|ini|sh|html))(?![\w/-])"
)
FOLDER = re.compile(r"^([A-Za-z_][\w-]*(?:/[\w-]+)*)/$")


def repo_path_exists(name: str, page: Path) -> bool:
    if (ROOT / name).exists() or (page.parent / name).exists():
        return True
    return "/" not in name and name in repo_names()


def check_paths(page: Path, item: Inline) -> list[str]:
    names = [m[1] for m in FILE_PATH.finditer(item.content)]
    if item.kind == "code":
        if folder := FOLDER.match(item.content):
            names.append(folder[1])
        if item.content in ("Dockerfile", "Makefile"):
            names.append(item.content)
    return [
        f"{rel(page)}:{item.line}: {name} does not exist"
        for name in names
        if not repo_path_exists(name, page)
    ]


INLINE_COMMAND = re.compile(r"^(?:\.venv/bin/)?taskman (\S+)|^make \S|^diff \S")


def check_inline_command(page: Path, item: Inline) -> str | None:
    """A command quoted in prose is validated like a block's (never run)."""
    text = item.content
    command = INLINE_COMMAND.match(text) if item.kind == "code" else None
    if not command:
        return None
    if command[1] and command[1] not in cli().commands and "--" not in text:
        return None  # prose about taskman (`taskman primes task`), not a command
    if re.search(r"[\[\]<>|…]|\.\.\.", text) or re.search(
        r"(?<![\w=-])[A-Z]{1,2}\b", text
    ):
        return None  # a synopsis with placeholders, not a command line
    try:
        segs, _ = segments(text)
        for seg in segs:
            validate(f"{rel(page)}:{item.line}", seg, text)
    except DocError as error:
        return str(error)
    except ValueError as error:  # shlex: unbalanced quotes
        return f"{rel(page)}:{item.line}: {error}\n    {text}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_resolve(page: Path) -> None:
    errors = [check_link(page, i) for i in inlines(page) if i.kind == "link"]
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_repo_paths_exist(page: Path) -> None:
    errors = [
        e for i in inlines(page) if i.kind != "link" for e in check_paths(page, i)
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_inline_commands_are_valid(page: Path) -> None:
    errors = [check_inline_command(page, i) for i in inlines(page)]
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)


# --- the checker itself catches rot ---------------------------------------------------


def fake_page(tmp_path: Path, markdown: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(markdown)
    return page


def test_shell_lines_are_joined_and_stripped_of_comments(tmp_path: Path) -> None:
    page = fake_page(
        tmp_path,
        '```sh\n# a comment\n\ncurl -s x:8000 \\\n  -d \'{"a": "#1"}\'  # why\nmake run\n```\n',
    )
    found = [(c.line, c.text) for c in commands(blocks(page)[0])]
    assert found == [(4, 'curl -s x:8000 -d \'{"a": "#1"}\''), (6, "make run")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("rm -rf /", "does not know"),
        ("grep -r TODO common", "does not know"),
        ("make run | less", "does not know"),
        ("make no-such-target", "no target"),
        ("make run NO_SUCH_VAR=1", "does not use NO_SUCH_VAR"),
        ("make run PHASE=4", "make run would run"),
        ("TASKMAN_NO_SUCH=1 make run", "not a taskman setting"),
        ("taskman serve --no-such-option", "No such option"),
        ("taskman frobnicate", "no command"),
        ("docker compose up --scale nobody=2", "no service"),
        ("export TASKMAN_NO_SUCH=1", "neither a taskman setting"),
        ("curl -s localhost:8000/health > out.json", "redirection"),
        ("curl -s localhost:8000/health && rm x", "one command per line"),
        ("curl -s localhost:8000/health 2>&1", "redirection"),
        ("curl -s example.com", "somewhere other than localhost"),
    ],
)
def test_a_wrong_command_is_caught(line: str, message: str) -> None:
    with pytest.raises(DocError, match=message):
        check_command(Command(ROOT / "docs" / "x.md", 1, line), None)


def test_a_reworded_log_message_is_caught(tmp_path: Path) -> None:
    good = "WARNING:  [taskman] shutting down: 3 queued task(s) are lost; phase 1 keeps tasks in memory only (phase 2 keeps them in Redis)"
    check_text(blocks(fake_page(tmp_path, f"```text\n{good}\n```\n"))[0])
    bad = good.replace("are lost", "are gone")
    with pytest.raises(DocError, match="reworded"):
        check_text(blocks(fake_page(tmp_path, f"```text\n{bad}\n```\n"))[0])


def test_links_and_paths_are_checked(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Some `code` heading: here\n")
    page = fake_page(
        tmp_path,
        "[a](other.md#some-code-heading-here) [b](other.md#nope) [c](gone.md)\n"
        "`common/api.py`, `common/gone.py`, `phase1_inprocess/`, `nowhere/`\n",
    )
    items = inlines(page)
    errors = [check_link(page, i) for i in items if i.kind == "link"]
    assert [bool(e) for e in errors] == [False, True, True]
    missing = [e for i in items if i.kind != "link" for e in check_paths(page, i)]
    assert (
        len(missing) == 2 and "common/gone.py" in missing[0] and "nowhere" in missing[1]
    )


def test_a_link_that_leaves_the_repository_is_caught() -> None:
    # ../shared/CONTRACT.md was on the machine the docs were written on; a clone
    # has no such file.
    outside = Inline(1, "link", "../shared/CONTRACT.md")
    assert "leaves the repository" in (check_link(ROOT / "README.md", outside) or "")


def test_unknown_block_tags_fail(tmp_path: Path) -> None:
    with pytest.raises(DocError, match="does not know"):
        check_block(blocks(fake_page(tmp_path, "```ruby\nputs 1\n```\n"))[0], tmp_path)


def test_a_diff_of_a_missing_file_fails(request: pytest.FixtureRequest) -> None:
    line = "diff -u common/nothing.py common/api.py"
    with pytest.raises(DocError, match="failed"):
        check_command(Command(ROOT / "docs" / "x.md", 1, line), request)
