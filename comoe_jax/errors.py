"""Every error a user can cause, and the process exit code each one maps to (a leaf module).

Each is raised with a one-line message naming the file, line, field or config key at
fault and what is allowed; :func:`comoe_jax.cli.run` prints it without a traceback and
exits with ``exit_code`` (the README's exit-code table).
"""

from __future__ import annotations

from comoe_jax.constants import EXIT_BAD_INPUT, EXIT_DIVERGED


class ComoeError(Exception):
    """Base of the errors below. ``label`` prefixes the printed message."""

    exit_code = EXIT_BAD_INPUT
    label = "error"


class ConfigError(ComoeError, ValueError):
    """A config value (file, override or run folder) that cannot be used."""

    label = "config error"


class DataError(ComoeError, ValueError):
    """Unusable data; the message names the file, the line or record, and the field."""

    label = "data error"


class LoadError(ComoeError, ValueError):
    """A model folder or file that cannot be used; the message names the file and the tensor."""

    label = "model error"


class AdapterFormatError(ComoeError, ValueError):
    """An adapter folder that cannot be read; the message names the file and the field."""

    label = "adapter error"


class RunFolderError(ComoeError):
    """A run folder (``train.output_dir``, ``--run``) that cannot be used: not a folder, not writable, damaged."""

    label = "run folder error"


class CheckpointError(ComoeError):
    """No intact checkpoint to resume from, or a state that must not be written (non-finite values)."""

    label = "checkpoint error"


class TrainingDiverged(ComoeError, FloatingPointError):
    """Too many consecutive non-finite steps; the checkpoints written before are intact and finite."""

    exit_code = EXIT_DIVERGED
    label = "training diverged"
