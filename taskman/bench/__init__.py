"""``taskman bench``: every phase as real processes, measured in one run against
baselines run in that same run, so each figure is a ratio that holds on any machine.

Nothing is imported here: ``taskman.bench.peers``' apps run under an interpreter
that has the peers' libraries and not RQ, so importing them must not import the
runner (which needs RQ). The entry points are ``runner.run`` and ``table.table``.
"""
