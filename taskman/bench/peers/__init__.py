"""The plainest FastAPI + X app a user would write, for each well-known Python task
queue X: POST /tasks enqueues an ``echo``, X's own worker runs it.

Each ``*_app.py`` imports only FastAPI and its own library (never RQ or taskman's
phases), so it runs under an interpreter that has the ``peers`` extra and nothing
else. ``registry.py`` says how the bench starts, fills and watches each one.
"""
