"""Name -> class registries for losses and aligners.

A registry is a plain dict filled by a decorator. Duplicate names raise at import time; an unknown name raises
an error that lists the known names and the closest match, so a typo in a YAML file names its own fix.
This module imports nothing heavy: `opd_lightning.losses` depends on it and must stay free of Lightning.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; its message lists the known names and the closest one."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict, Generic[T]):
    """A dict of `name -> class` with a registering decorator and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that files the class under `name` (snake_case, the method's common name)."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice: {self[name].__qualname__} and {cls.__qualname__}")
            self[name] = cls
            cls.registry_name = name
            return cls

        return decorator

    def __missing__(self, name: str) -> type[T]:
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known names: {', '.join(sorted(self))}.")

    def build(self, name: str, **kwargs) -> T:
        """Instantiate the class registered under `name` with `kwargs`."""
        return self[name](**kwargs)
