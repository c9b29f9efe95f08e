"""Errors raised by gradleak's kernels.

`kernels` sits below the engine and imports nothing from `service`, so it has its own two
exception classes; both carry a one-line message meant to be shown as is. They derive from the
builtin classes a caller would expect (bad arguments are a `ValueError`, a backend that cannot
run here a `RuntimeError`).
"""

from __future__ import annotations


class KernelInputError(ValueError):
    """Arguments that cannot be matched: lengths, shapes, devices, dtypes, weights, options."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on these tensors in this process."""
