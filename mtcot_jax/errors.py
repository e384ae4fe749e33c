"""The errors a user can fix, and what the command lines do with them: one sentence,
no traceback. Imports nothing but the standard library, so every layer may read it.

Errors raised for bad input (a config key or value, a missing or broken file, a
prompt the tokenizer cannot write, a workdir another run holds) name the file,
the value and what is accepted; a traceback adds nothing to them. Set
MTCOT_TRACEBACK=1 to see it anyway. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys


class ConfigError(ValueError):
  """A config key, type or value that is not accepted."""


class RunLockedError(RuntimeError):
  """Another process is training in this workdir."""


USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, RunLockedError)


def user_errors(main):
  """Wraps a command line's main(argv): a user error exits with status 2 and its message."""
  @functools.wraps(main)
  def wrapped(argv=None):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get("MTCOT_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped
