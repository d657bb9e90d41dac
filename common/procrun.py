"""honcho (the Procfile runner of `make run`), with its stop deadline set from SHUTDOWN_GRACE.

On Ctrl-C honcho sends SIGTERM to every process, then SIGKILL to those still
running after `honcho.manager.KILL_WAIT`, a module constant of 5 s. Our services
drain for up to SHUTDOWN_GRACE (10 s by default) before they exit; a worker killed
halfway leaves its in-flight calls pending until its lease lapses, and its
registration behind. So here the deadline is the grace plus `EXIT_MARGIN` for a
process's own exit. (honcho has no option for it: the constant is set before it runs.)
"""

from __future__ import annotations

import honcho.manager
from honcho.command import main as honcho_main

from common.settings import exit_on_config_error, get_settings

# Seconds past SHUTDOWN_GRACE a process has to exit before it is killed.
EXIT_MARGIN = 5.0


def kill_wait() -> float:
    """How long honcho waits, after its SIGTERM, before it SIGKILLs what still runs."""
    return get_settings().shutdown_grace + EXIT_MARGIN


def main() -> None:
    honcho.manager.KILL_WAIT = kill_wait()
    honcho_main()


if __name__ == "__main__":
    with exit_on_config_error("make run"):
        main()
