"""What both launchers (``tpu_pod.py``, ``slurm.py``) share: the user-error type and the split of
``--config.*`` overrides / ``--`` passthrough from the launcher's own flags. Standard library only."""
from __future__ import annotations

from typing import Sequence


class LaunchError(Exception):
  """A user error with a message that says what to fix."""


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--config.key=value` (or `--config.key value`) and everything after `--` out of argv.

  Returns (rest, passthrough): passthrough goes to `python -m dimr_jax.main` verbatim.
  """
  rest, overrides, argv, i = [], [], list(argv), 0
  while i < len(argv):
    a = argv[i]
    if a == "--":
      overrides.extend(argv[i + 1:])
      break
    if a.startswith("--config."):
      if "=" not in a:
        if i + 1 >= len(argv):
          raise LaunchError(f"{a} needs a value (--config.key=value)")
        a, i = f"{a}={argv[i + 1]}", i + 1
      overrides.append(a)
    else:
      rest.append(a)
    i += 1
  return rest, overrides
