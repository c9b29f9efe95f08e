"""Post-processing defenses a client may apply to its update before sharing it ("what-if" audits)."""

from service.defenses.base import DEFENSES, Defense, apply_defenses, catalog
from service.defenses.compression import quantize, sign, topk
from service.defenses.perturbation import clip, noise

__all__ = ["DEFENSES", "Defense", "apply_defenses", "catalog", "clip", "noise", "quantize", "sign", "topk"]
