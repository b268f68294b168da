"""The exit codes of every ``sessionbus`` command, named once (``--help`` lists them)."""

from __future__ import annotations

RET_OK = 0  # stopped cleanly, or the command did what it was asked
RET_FAILURE = 1  # failed while running (see the log)
RET_USAGE = 2  # unknown flag, bad value (argparse)
RET_CONFIG = 3  # a file or setting cannot be used, a port is taken
RET_BROKER = 4  # the broker could not be reached by a command that needs it at once
RET_INTERRUPTED = 130  # a second SIGINT/SIGTERM cut the graceful stop short

EXIT_CODES = f"""\
exit codes:
  {RET_OK:<4} stopped cleanly (or the command did what it was asked)
  {RET_FAILURE:<4} failed while running (see the log)
  {RET_USAGE:<4} bad usage: unknown flag, bad value
  {RET_CONFIG:<4} a file or setting cannot be used (missing certificate, bad bus-key file, a
       listening address in use, ...); with --check: a check of settings or files failed
  {RET_BROKER:<4} the broker could not be reached (or refused a permission) by a command that
       needs it at once; with --check: a broker check failed
  {RET_INTERRUPTED:<4} a second SIGINT/SIGTERM cut the graceful stop short
"""
