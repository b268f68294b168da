"""Start a module (``-m NAME ...``) or a program so that it gets SIGTERM if the benchmark that
started it dies (``prctl(PR_SET_PDEATHSIG)``), even by SIGKILL: no orphaned nodes or loaders.

``python -m bench._pdeathsig -m sessionbus node ...`` runs the module in this process;
``python -m bench._pdeathsig openssl s_time ...`` execs the program (same PID either way).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PARENT_ENV = "SESSIONBUS_BENCH_PARENT"
_PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = int(os.environ.pop(PARENT_ENV, "0") or 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m bench._pdeathsig (-m MODULE | PROGRAM) ARGS...")
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        os.execvp(args[0], args)


if __name__ == "__main__":
    main()
