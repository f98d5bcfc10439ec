"""``taskman demo`` (being split into modules)."""

from taskman.demo.narration import run

__all__ = ["run"]
