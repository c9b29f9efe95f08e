"""Gradient inversion attacks, one per module, looked up by name in ATTACKS."""

from __future__ import annotations

from service.attacks.base import Attack, AttackProblem, AttackResult, Control
from service.attacks.dlg import DLG
from service.attacks.fedavg import FedAvgUnroll
from service.attacks.generative import Ggl, Gias
from service.attacks.inverting import GradInversion, InvertingGradients
from service.registry import Registry
from service.specs import ATTACK_PARAMS

ATTACKS: Registry[Attack] = Registry("attack")
for _attack in (DLG(), InvertingGradients(), GradInversion(), FedAvgUnroll(), Gias(), Ggl()):
    ATTACKS.add(_attack.name, _attack)


def catalog() -> list[dict[str, object]]:
    """Attacks with the knowledge level each needs and their parameters' JSON schema."""
    return [
        {
            "name": name,
            "description": attack.description,
            "required_knowledge": int(attack.required_knowledge),
            "parameters": ATTACK_PARAMS[name].model_json_schema(),
        }
        for name, attack in ATTACKS.items()
    ]


__all__ = ["ATTACKS", "Attack", "AttackProblem", "AttackResult", "Control", "catalog"]
