"""How the command-line entry points end: known user errors as one message, Ctrl-C as one line, bugs as tracebacks.

Every `python -m ...` entry point runs its plain function through `run_main`:

* a `vlm.errors.UserError` (bad config value, bad file, model that cannot load, ...) prints ``error: <message>``
  on stderr and exits with status 2; with ``HYDRA_FULL_ERROR=1`` (or ``ADAPTINFER_DEBUG=1``) in the environment
  the traceback is kept, for debugging;
* Ctrl-C prints ``interrupted; rerun the same command to resume`` and exits with status 130 (every long step of
  the toolkit resumes: collection skips stored samples, the benchmark skips rows in its table);
* anything else propagates with its traceback: it is a bug, not a user error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from vlm.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"
DEBUG_VARIABLES = ("HYDRA_FULL_ERROR", "ADAPTINFER_DEBUG")

T = TypeVar("T")


def debug_requested() -> bool:
    """True when the environment asks for full tracebacks (HYDRA_FULL_ERROR=1 or ADAPTINFER_DEBUG=1)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_VARIABLES)


def hydra_run_dir() -> Path | None:
    """The Hydra run directory when the user set one (`hydra.run.dir=DIR`), else None.

    The entry points' configs set `hydra.run.dir: .` with no `.hydra` subdirectory and terminal-only logging, so
    Hydra itself writes nothing (a run that stops on a bad input leaves no files); their own `output` defaults to a
    timestamped directory under outputs/.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    return run_dir if run_dir != Path.cwd().resolve() else None


def run_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`; end the process cleanly on a user error or Ctrl-C (see the module docstring)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED_MESSAGE}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except UserError as err:
        if debug_requested():
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "INTERRUPTED_MESSAGE", "debug_requested", "hydra_run_dir", "run_main"]
