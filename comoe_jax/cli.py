"""What every command-line script shares: user errors become one-line messages and documented exit codes.

    @command
    def main(argv=None) -> int: ...

``main(argv)`` then returns 0 (finished), 2 (bad input: config, data, model, adapter,
checkpoint or file problems), 3 (training diverged) or 75 (interrupted by SIGTERM / Ctrl-C
after saving; rerun the same command to resume); see ``comoe_jax.constants``. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable

from comoe_jax.constants import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from comoe_jax.errors import ComoeError


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a script's ``main(argv)`` so user errors print one line and return their exit code."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        previous = _sigterm_interrupts()
        try:
            code = main(argv)
        except ComoeError as e:
            fail(f"{e.label}: {e}")
            return e.exit_code
        except KeyboardInterrupt as e:
            fail(f"interrupted{' (SIGTERM)' if str(e) == 'SIGTERM' else ''}; what was saved is kept: rerun the same "
                 "command to continue")
            return EXIT_INTERRUPTED
        except OSError as e:  # unreadable or unwritable paths, a full disk: the message names the file
            fail(f"file error: {e}")
            return EXIT_BAD_INPUT
        except Exception as e:
            if not _out_of_memory(e):
                raise
            fail(f"out of memory: {_first_line(e).rstrip('.')}; this run does not fit the device: lower "
                 "train.batch_size (optim.grad_accum_steps keeps the batch), data.seq_len or eval.batch_size, set "
                 "model.remat=true or model.dtype=bfloat16, or shard over more devices (mesh.fsdp)")
            return EXIT_BAD_INPUT
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return EXIT_OK if code is None else code

    return run


def _sigterm_interrupts():
    """SIGTERM (a scheduler's stop) outside the training loop (loading, evaluation) ends the command like Ctrl-C,
    with the interrupted exit code, instead of killing it silently with 143. The training loop installs its own
    handler (save the step, then stop); with several processes JAX's preemption notifier takes SIGTERM over.
    Returns the handler replaced (None where none could be installed: not the main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None


def _out_of_memory(error: Exception) -> bool:
    """XLA's allocation failure (a ``JaxRuntimeError`` with status RESOURCE_EXHAUSTED, or XLA:CPU's INTERNAL
    "Out of memory allocating ..."), or the host's."""
    text = str(error)
    return isinstance(error, MemoryError) or (type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
                                              and ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
