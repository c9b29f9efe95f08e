"""Domain exceptions. No HTTP here: api/errors.py maps each class to a status once."""

from __future__ import annotations


class GradleakError(Exception):
    """Base of every error gradleak raises on purpose; its message is shown to the user as is."""


class SpecError(GradleakError):
    """A job spec is malformed or inconsistent."""


class KnowledgeError(SpecError):
    """The spec asks the attack to use knowledge the attacker was not granted."""


class UnknownNameError(SpecError):
    """A registry lookup failed; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid)}")


class ArtifactError(GradleakError):
    """An uploaded or local file cannot be used (wrong format, corrupt, mismatched)."""


class UnsupportedFormatError(ArtifactError):
    """The file is not safetensors (a pickle, a zip archive, a torch.save file ...)."""


class ShapeMismatchError(ArtifactError):
    """Tensor names or shapes do not match the architecture; lists the first mismatches."""

    def __init__(self, message: str, mismatches: list[str]) -> None:
        self.mismatches = mismatches
        super().__init__(message)


class DatasetNotFoundError(GradleakError):
    """A local dataset is missing; the message names the path looked at."""


class NotFoundError(GradleakError):
    """A stored object (upload, job, artifact) does not exist for this tenant."""


class JobCancelledError(GradleakError):
    """The job was cancelled while running."""


class MetricUnavailableError(GradleakError):
    """A metric cannot be computed here (e.g. LPIPS weights missing); the message says why."""


class UnsupportedOpsError(ArtifactError):
    """An ONNX graph uses operators gradleak does not convert, or whose second-order gradient
    the attacks cannot take; `ops` lists them."""

    def __init__(self, message: str, ops: list[str]) -> None:
        self.ops = ops
        super().__init__(message)
