"""``taskman demo``: a narrated tour of the three phases, live, against real
processes: what each phase promises, and what it cannot keep.

Every server, worker and Redis it starts is stopped again when it ends, on an error,
Ctrl-C, SIGTERM or a closed terminal included (a second Ctrl-C stops them at once).
"""

from taskman.demo.tour import run

__all__ = ["run"]
