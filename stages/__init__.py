"""The DVC stages' command-line programs, run as ``python -m stages.<stage>`` (see dvc.yaml).

Importing the package asks Linux to SIGTERM the process when the program that started it exits, so
killing `dvc repro` leaves no orphan writing outputs that ``dvc.lock`` will not record. That program
is the parent (PR_SET_PDEATHSIG) or, when the parent is a shell running a command string
(``sh -c ...``), the shell's parent: DVC runs a command through ``$SHELL -c``, or ``/bin/sh -c``
when SHELL is unset (cron, CI, services), and dash, unlike bash, does not exec the command but
waits for it, so the shell would outlive dvc and keep the stage alive. A daemon thread blocked on a
pidfd of the shell's parent covers that case. Both happen here, before a stage module's own imports,
because those take seconds (torch) and a parent killed meanwhile would go unnoticed (measured: under
load the test that kills dvc 2 s after the stage started found it still running). Elsewhere than
Linux this is a no-op.
"""

import errno
import os
import select
import signal
import sys
import threading

SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _parent_of(pid: int) -> int | None:
    """``pid``'s parent from /proc (None when it is gone)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4; field 2, the name, may hold spaces


def _runs_command_string(pid: int) -> bool:
    """Whether ``pid`` is a shell started as ``<shell> [options] -c <command>``."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return os.path.basename(argv[0]).decode(errors="replace").lstrip("-") in SHELLS and b"-c" in argv


def _terminate_when_readable(fd: int) -> None:
    select.select([fd], [], [])  # a pidfd turns readable when its process exits
    os.kill(os.getpid(), signal.SIGTERM)


def _stop_with_launcher() -> None:
    """SIGTERM this process when the program that started it exits (see the module docstring)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    shell = os.getppid()
    launcher = _parent_of(shell) if _runs_command_string(shell) else None
    if launcher is None or launcher <= 1:
        return
    try:
        fd = os.pidfd_open(launcher)
    except OSError as e:  # ESRCH: exited already; otherwise a kernel < 5.3: only the parent is watched
        if e.errno == errno.ESRCH:
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if _parent_of(shell) != launcher:  # exited, its pid perhaps reused, before the pidfd was opened
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_terminate_when_readable, args=(fd,), daemon=True, name="stop-with-launcher").start()


if sys.platform.startswith("linux"):
    _stop_with_launcher()
