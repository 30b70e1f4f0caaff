"""The storage tests' real servers, for the miss reasons that need a remote tier."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "storage"))

from redis_servers import redis_server  # noqa: F401  (a session fixture: one redis-server for the run)
