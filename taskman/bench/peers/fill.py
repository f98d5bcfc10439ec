"""``python -m taskman.bench.peers.fill MODULE COUNT``: COUNT echo jobs enqueued by
the peer's own client (under the peer's interpreter), for its worker to drain."""

import importlib
import sys

if __name__ == "__main__":
    module, count = sys.argv[1], int(sys.argv[2])
    importlib.import_module(f"taskman.bench.peers.{module}").fill(count)
