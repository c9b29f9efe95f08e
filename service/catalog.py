"""What gradleak offers, for `gradleak catalog` and GET /v1/catalog.

Every parameter line is generated from the parameter models' own fields (service/specs.py: name,
default, description, choices and bounds) and every knob from the architecture registry, so the
catalog cannot drift from the code. `describe(name)` shows one entry in full; an architecture's
view is the concatenation of ARCHITECTURE_SECTIONS, to which other parts may add lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from service.errors import UnknownNameError

PHOTO_RANGE_AT = 10  # a category with more names than this is shown as a range in text


def field_entries(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One entry per parameter of a pydantic parameter model: default, description, type and
    constraints, read from the model itself (its JSON schema gives types and bounds)."""
    props = model.model_json_schema().get("properties", {})
    out = []
    for name, info in model.model_fields.items():
        if name == "name":  # the discriminator, not a parameter
            continue
        prop = props.get(name, {})
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        entry: dict[str, Any] = {
            "name": name,
            "type": _type_text(prop),
            "default": json.loads(json.dumps(default, default=str)),
            "description": info.description or "",
        }
        if required:  # no default: the spec must give it (a latent-space attack's generator)
            entry["required"] = True
        for bound in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            value = _find(prop, bound)
            if value is not None:
                entry[bound] = value
        choices = _find(prop, "enum")
        if choices is not None:
            entry["choices"] = choices
        out.append(entry)
    return out


def _find(prop: dict[str, Any], key: str) -> Any:
    if key in prop:
        return prop[key]
    for alt in prop.get("anyOf", []):
        if key in alt:
            return alt[key]
    return None


def _type_text(prop: dict[str, Any]) -> str:
    options = prop.get("anyOf", [prop])
    names = []
    for o in options:
        if "enum" in o:
            names.append("choice")
        elif o.get("type") == "array":
            names.append(f"list[{o.get('items', {}).get('type', 'any')}]")
        else:
            names.append(str(o.get("type", "any")))
    return " | ".join(dict.fromkeys(names))


def _attacks() -> list[dict[str, Any]]:
    from service.attacks import ATTACKS
    from service.specs import ATTACK_PARAMS

    out = []
    for name, attack in ATTACKS.items():
        params = ATTACK_PARAMS[name]
        level = params.required_knowledge
        out.append(
            {
                "name": name,
                "description": attack.description,
                "required_knowledge": int(level),
                "knowledge": level.describe,
                "fields": field_entries(params),
                "parameters": params.model_json_schema(),
            }
        )
    return out


def _defenses() -> list[dict[str, Any]]:
    from service.defenses import DEFENSES

    return [
        {
            "name": name,
            "description": d.description,
            "fields": field_entries(d.spec_type),
            "parameters": d.spec_type.model_json_schema(),
        }
        for name, d in DEFENSES.items()
    ]


def _photos() -> dict[str, list[str]]:
    from service.data.photos import CATEGORIES, photo_names

    return {category: photo_names(category) for category in CATEGORIES}


def full_catalog() -> dict[str, Any]:
    from service.generators import generator_catalog
    from service.metrics import metric_catalog
    from service.models import catalog as architectures

    return {
        "attacks": _attacks(),
        "architectures": architectures(),
        "defenses": _defenses(),
        "metrics": metric_catalog(),
        "photos": _photos(),
        "generators": generator_catalog(),
    }


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def _value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _default(f: dict[str, Any]) -> str:
    return "(required)" if f.get("required") else _value(f["default"])


def field_line(f: dict[str, Any], indent: str = "    ") -> str:
    """`name = default  (type; choices or bounds)  description`."""
    limits = []
    if "choices" in f:
        limits.append("one of " + ", ".join(map(_value, f["choices"])))
    bounds = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
    for key, op in bounds:
        if key in f:
            limits.append(f"{op} {f[key]}")
    kind = f["type"] if not limits else f"{f['type']}; {'; '.join(limits)}"
    text = f"{indent}{f['name']} = {_default(f)}  ({kind})"
    return text + (f"  {f['description']}" if f.get("description") else "")


def _photo_names_text(names: list[str]) -> str:
    if len(names) > PHOTO_RANGE_AT:
        return f"{names[0]}..{names[-1]} ({len(names)})"
    return ", ".join(names)


def overview(cat: dict[str, Any]) -> str:
    """`gradleak catalog`: every attack with its defaults, architectures with knob defaults,
    defenses with theirs, metrics and photo names."""
    lines = ["attacks (gradleak catalog NAME shows one in full):"]
    for a in cat["attacks"]:
        lines.append(f"  {a['name']:<22} knowledge level {a['required_knowledge']}  {a['description']}")
        defaults = ", ".join(f"{f['name']}={_default(f)}" for f in a["fields"])
        lines.append(f"    defaults: {defaults}")
    lines.append("architectures (knobs with their defaults):")
    for m in cat["architectures"]:
        lines.append(f"  {m['name']:<22} {m.get('description', '')}")
        knobs = ", ".join(f"{k['name']}={_value(k['default'])}" for k in m.get("knobs", []))
        if knobs:
            lines.append(f"    knobs: {knobs}")
    lines.append("defenses:")
    for d in cat["defenses"]:
        params = ", ".join(f"{f['name']}={_value(f['default'])}" for f in d["fields"])
        lines.append(f"  {d['name']:<22} {d['description']}" + (f"  [{params}]" if params else ""))
    lines.append("metrics:")
    for m in cat["metrics"]:
        way = "higher" if m["higher_is_more_leak"] else "lower"
        lines.append(f"  {m['name']:<22} {m['description']} ({way} = more leakage)")
    lines.append("generator architectures (gradleak generator train; POST /v1/generators):")
    for g in cat.get("generators", []):
        lines.append(f"  {g['name']:<22} {g['description']} (sides {g['sizes']})")
    lines.append("photos (--images NAME,...; by category):")
    for category, names in cat["photos"].items():
        lines.append(f"  {category:<22} {_photo_names_text(names)}")
    return "\n".join(lines)


Section = Callable[[dict[str, Any]], list[str]]


def _arch_head(m: dict[str, Any]) -> list[str]:
    return [
        f"architecture {m['name']}: {m.get('description', '')}",
        f"  smallest image side: {m['min_size']}",
    ]


def _arch_knobs(m: dict[str, Any]) -> list[str]:
    knobs = m.get("knobs", [])
    if not knobs:
        return ["  knobs: none"]
    return ["  knobs (--knob NAME=VALUE, JSON for lists):", *(field_line(k) for k in knobs)]


# The lines of `gradleak catalog ARCH`, in order; append a Section to show more of every architecture.
ARCHITECTURE_SECTIONS: list[Section] = [_arch_head, _arch_knobs]


def _attack_view(a: dict[str, Any]) -> list[str]:
    return [
        f"attack {a['name']}: {a['description']}",
        f"  needs knowledge level {a['required_knowledge']} ({a['knowledge']})",
        "  parameters (--param NAME=VALUE):",
        *(field_line(f) for f in a["fields"]),
    ]


def _defense_view(d: dict[str, Any]) -> list[str]:
    params = [field_line(f) for f in d["fields"]] or ["    none"]
    return [f"defense {d['name']}: {d['description']}", "  parameters (--defense NAME:KEY=VALUE):", *params]


def _metric_view(m: dict[str, Any]) -> list[str]:
    way = "higher" if m["higher_is_more_leak"] else "lower"
    unit = f", unit {m['unit']}" if m.get("unit") else ""
    return [f"metric {m['name']}: {m['description']}", f"  {way} means more leakage{unit}; kind {m['kind']}"]


def _generator_view(g: dict[str, Any]) -> list[str]:
    conditional = {"never": "no", "required": "yes (num_classes)", "optional": "optional"}[g["conditional"]]
    return [
        f"generator architecture {g['name']}: {g['description']}",
        f"  image sides: {g['sizes']}; class-conditional: {conditional}; default width {g['default_width']}",
        "  file: safetensors, manifest JSON in the metadata key 'gradleak.generator'",
    ]


VIEWS: dict[str, list[Section]] = {
    "attacks": [_attack_view],
    "architectures": ARCHITECTURE_SECTIONS,
    "defenses": [_defense_view],
    "metrics": [_metric_view],
    "generators": [_generator_view],
}


def describe(name: str, cat: dict[str, Any] | None = None) -> str:
    """One entry in full: an attack, architecture, defense, metric or photo category."""
    cat = cat if cat is not None else full_catalog()
    for kind, sections in VIEWS.items():
        for entry in cat.get(kind, []):
            if entry["name"] == name:
                return "\n".join(line for section in sections for line in section(entry))
    if name in cat["photos"]:
        return f"photos of category {name}: " + ", ".join(cat["photos"][name])
    valid = [e["name"] for kind in VIEWS for e in cat.get(kind, [])] + list(cat["photos"])
    raise UnknownNameError("catalog entry", name, valid)
