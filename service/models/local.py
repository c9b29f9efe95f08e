"""The user's own torch module, for local runs only (CLI, embedded SDK, FL integrations).

Running a user's module means running the user's code, which is fine in the user's own process
and never over HTTP. So a spec names a module (`ModelSpec(arch="module", source=...)`) only by a
key of this process's table: local code puts modules there (`register_module`, or
`import_factory` for an import path `package.module:factory`), and a job looks them up. A
server's table is empty, so a spec that names a module there is refused: it takes ONNX.

The weight-naming contract is the module's own: the update's tensors are named like its
`named_parameters()` (and `state_dict()` for weights and deltas).
"""

from __future__ import annotations

import copy
import importlib
import re
import secrets
import threading

from torch import nn

from service.errors import SpecError

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_MODULES: dict[str, nn.Module] = {}
_LOCK = threading.Lock()


def register_module(module: nn.Module, key: str | None = None) -> str:
    """Keep `module` for jobs of this process; return the key a spec names it by."""
    if not isinstance(module, nn.Module):
        raise SpecError(f"a model must be a torch nn.Module, got {type(module).__name__}")
    key = key or f"object:{secrets.token_hex(8)}"
    with _LOCK:
        _MODULES[key] = module
    return key


def unregister_module(key: str) -> None:
    with _LOCK:
        _MODULES.pop(key, None)


def local_module(key: str) -> nn.Module:
    """A private copy of the module registered as `key` (jobs train and move their copy)."""
    with _LOCK:
        module = _MODULES.get(key)
    if module is None:
        raise SpecError(
            f"model.source {key!r} names no torch module of this process: torch modules and import "
            "paths are for local runs (CLI, embedded SDK); a server takes your model as ONNX "
            "(POST /v1/models with metadata format 'onnx')"
        )
    return copy.deepcopy(module)


def is_import_path(text: str) -> bool:
    return bool(_IMPORT_PATH.match(text))


def import_factory(path: str) -> nn.Module:
    """Import `package.module:factory` (the user's own code) and call the factory with no
    arguments; it must return an nn.Module."""
    if not is_import_path(path):
        raise SpecError(f"a model import path reads 'package.module:factory', got {path!r}")
    module_name, attr = path.split(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise SpecError(f"cannot import {module_name!r} for model {path!r}: {e}") from None
    except AttributeError:
        raise SpecError(f"{module_name!r} has no {attr!r} (model {path!r})") from None
    if not callable(obj):
        raise SpecError(f"model {path!r} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise SpecError(f"model {path!r} returned {type(model).__name__}, not a torch nn.Module")
    return model
