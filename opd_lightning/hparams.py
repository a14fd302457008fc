"""The module's configuration as plain data, so that a checkpoint rebuilds the module that wrote it.

A module built by `opd` (LightningCLI) records its YAML configuration; one built in Python records the objects it was
given. Those objects can hold what a checkpoint should not (tokenizers bound into an aligner, a lambda as optimizer
factory), so `plain` turns each argument into the data that rebuilds it: dataclasses into dicts, a registered loss
or aligner into `{name: ..., <its hyperparameters>}`, a class into `{class_path: ...}`. `build` is the way back,
used by `DistillationModule.__init__` on each argument, so a module can also be written in Python with dicts
(`rollout={"on_policy_fraction": 0.5}`). An argument with no plain form (a lambda) is left out of the record: the
rebuilt module takes its default, or what `load_from_checkpoint(path, optimizer=...)` passes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any

__all__ = ["NoPlainForm", "build", "build_class", "factory", "plain", "record_hyperparameters", "spec_of"]


class NoPlainForm(TypeError):
    """Raised for a value that cannot be written as plain data (e.g. a lambda)."""


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def spec_of(obj: Any) -> dict:
    """`{name: <registry name>, <hyperparameters>}` of a registered loss or aligner instance (else `class_path` and
    `init_args`); hyperparameters are read back from the attributes named like the `__init__` arguments."""
    params = {}
    for name, param in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            raise NoPlainForm(f"{type(obj).__name__} keeps no attribute {name!r} for its argument of that name")
        params[name] = plain(getattr(obj, name))
    name = getattr(type(obj), "registry_name", "")
    return {"name": name, **params} if name else {"class_path": _path(type(obj)), "init_args": params}


def plain(value: Any) -> Any:
    """`value` as YAML-able data (see the module docstring); raises `NoPlainForm` where there is none."""
    from opd_lightning.aligners import Aligner
    from opd_lightning.losses import DistillationLoss
    from opd_lightning.objective import LossTerm

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, LossTerm):
        return {"loss": plain(value.loss), "weight": value.weight, "reference": value.reference,
                "completions": value.completions}
    if isinstance(value, DistillationLoss | Aligner):
        return spec_of(value)
    if isinstance(value, type):
        return {"class_path": _path(value)}
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": _path(value.func), "init_args": plain(value.keywords)}
    raise NoPlainForm(f"{value!r} has no plain form")


def build_class(spec: dict, *args: Any) -> Any:
    """Import `spec["class_path"]` and call it with `args` and `spec["init_args"]`."""
    return _import(spec["class_path"])(*args, **spec.get("init_args", {}))


def build(value: Any, cls: type) -> Any:
    """`value` as an instance of the dataclass `cls`: dicts are unpacked into it, instances and None pass through."""
    if isinstance(value, dict):
        return cls(**value)
    return value


def factory(value: Any) -> Any:
    """An optimizer or scheduler factory from its plain form (`{class_path, init_args}`), else `value` itself."""
    if isinstance(value, dict) and "class_path" in value:
        return functools.partial(_import(value["class_path"]), **value.get("init_args", {}))
    return value


def record_hyperparameters(module) -> None:
    """`module.save_hyperparameters()`, with a Python-built module's arguments turned into plain data.

    A module built by LightningCLI records its parsed config, already plain (and the instantiator that rebuilds it).
    An optimizer or scheduler with no plain form (a lambda) is left out, so a rebuilt module takes the default;
    anything else without one stays the object it was (pickled into the checkpoint).
    """
    module.save_hyperparameters(logger=False)
    if "_instantiator" in module.hparams:
        return
    for key in list(module.hparams):
        try:
            module.hparams[key] = plain(module.hparams[key])
        except NoPlainForm:
            if key in ("optimizer", "scheduler"):
                del module.hparams[key]
