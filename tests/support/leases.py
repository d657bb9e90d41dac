"""Heartbeat leases short enough for a test to see one end: a worker's (its calls
reclaimed by another) or the RPC client's grace after Redis restarted, which lasts one
lease (`common.rejoin`)."""

from __future__ import annotations

from common.settings import Settings

# A lease, and so a grace, of 1 s.
ONE_SECOND_LEASES = Settings(heartbeat_interval=0.5, heartbeat_ttl=1.0)

# A lease, and so a grace, of 3 s: longer than Redis's uptime is off (it counts whole
# seconds) on a slow machine.
THREE_SECOND_LEASES = Settings(heartbeat_interval=1.0, heartbeat_ttl=3.0)

# Leases of 0.6 s renewed (and reaped) every 0.2 s: a lost worker's calls are
# reclaimed within a second. Settings fields, for `dataclasses.replace`.
QUICK_LEASES = {"heartbeat_interval": 0.2, "heartbeat_ttl": 0.6}

# The same, as a worker process's environment (`HEARTBEAT_INTERVAL`, `HEARTBEAT_TTL`).
QUICK_LEASES_ENV = {name.upper(): str(value) for name, value in QUICK_LEASES.items()}
