"""What gradleak offers, for `gradleak catalog` and the API's catalog routes."""

from __future__ import annotations

from typing import Any


def full_catalog() -> dict[str, list[dict[str, Any]]]:
    from service.attacks import catalog as attacks
    from service.defenses import catalog as defenses
    from service.metrics import metric_catalog as metrics
    from service.models import catalog as architectures

    return {
        "attacks": attacks(),
        "architectures": architectures(),
        "defenses": defenses(),
        "metrics": metrics(),
    }
