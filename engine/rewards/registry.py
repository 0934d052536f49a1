"""Reward functions by name: a registry filled by a decorator, or ``package.module:function``.

A reward function scores one rollout::

    def my_reward(prompt: str, response: str, metadata: dict, **kwargs) -> float | dict[str, float]

``metadata`` is the prompt row's extra fields plus its ``answer``
(:meth:`engine.data.prompts.PromptRow.reward_metadata`); ``kwargs`` come from the
config's ``kwargs``. A *batched* function takes lists instead (``prompts, responses,
metadatas``) and returns a list with one value per row. A dict return reports named
sub-scores; its sum is the function's value.

Register with ``@reward_function("name")`` (``batched=True`` for a batched one), or
name any module-level function as ``package.module:function`` (mark a batched one with
:func:`batched`). Functions run in worker processes, so they must live in an importable
module (not in the script run as ``__main__``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from engine.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
KwargsCheck = Callable[[dict[str, Any]], None]
# (prompt text, metadata) -> None when the function can judge the row, else (the row's field, what it needs there)
RowCheck = Callable[[str, dict[str, Any]], Optional[tuple[str, str]]]
# a RowCheck that may also take some of the function's configured kwargs by name (math_answer's answer_key)
Judges = Callable[..., Optional[tuple[str, str]]]
BATCHED_ATTR = "keel_reward_batched"
CHECK_ATTR = "keel_reward_check"


@dataclass(frozen=True)
class RewardFunction:
    """A resolved reward function: its ``name``, the callable, whether it is ``batched``, an
    optional ``check`` of its kwargs run before any work (raises ``ValueError`` with the problem), and
    an optional ``judges`` check of the prompt rows it can score (see :func:`reward_function`)."""

    name: str
    fn: Callable[..., Any]
    batched: bool = False
    check: Optional[KwargsCheck] = None
    judges: Optional[Judges] = None

    def row_check(self, kwargs: dict[str, Any]) -> Optional[RowCheck]:
        """``judges`` given those of the configured ``kwargs`` it names among its parameters (all of them when it
        takes ``**kwargs``), so rows are judged as the function will read them; None without one. The kwargs
        are validated first (:meth:`validate_kwargs`)."""
        if self.judges is None:
            return None
        self.validate_kwargs(kwargs)
        parameters = inspect.signature(self.judges).parameters
        if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
            taken = dict(kwargs)
        else:
            taken = {key: value for key, value in kwargs.items() if key in parameters}
        return functools.partial(self.judges, **taken) if taken else self.judges

    def validate_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` when ``kwargs`` do not fit the function's signature or check."""
        sample: tuple[Any, ...] = ([], [], []) if self.batched else ("", "", {})
        signature = inspect.signature(self.fn)
        try:
            signature.bind_partial(*sample)  # required kwargs come from the config, checked below
        except TypeError as exc:  # the call itself does not fit, whatever the kwargs
            called = "(prompts, responses, metadatas, **kwargs), each a list" if self.batched else \
                "(prompt, response, metadata, **kwargs)"
            plain = signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                                  for p in signature.parameters.values()],
                                      return_annotation=inspect.Signature.empty)
            raise ConfigError(f"reward function {self.name!r}: {self.fn.__name__}{plain} cannot be called as "
                              f"{self.fn.__name__}{called} ({exc}); give it that signature (metadata: the prompt "
                              "row's other fields, such as answer)") from None
        try:
            signature.bind(*sample, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"reward function {self.name!r}: kwargs {kwargs!r} do not fit "
                              f"{self.fn.__name__}{signature}: {exc}") from None
        if self.check is not None:
            try:
                self.check(kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"reward function {self.name!r}: kwargs {kwargs!r}: {exc}") from None


REGISTRY: dict[str, RewardFunction] = {}


def reward_function(name: Optional[str] = None, *, batched: bool = False, check: Optional[KwargsCheck] = None,
                    judges: Optional[Judges] = None) -> Callable[[F], F]:
    """Decorator: register a reward function under ``name`` (default: the function's name).

    ``batched=True``: the function takes ``(prompts, responses, metadatas, **kwargs)`` lists and
    returns a list. ``check(kwargs)`` validates the configured kwargs before any work.
    ``judges(prompt, metadata)`` says which prompt rows the function can score: None, or the row's
    field and what the function needs there; it is also given those of the configured kwargs it
    names as parameters (math_answer's ``answer_key``). Before any work the trainers refuse a prompt
    file of which it can judge no row, and warn about the rows it cannot judge.
    """

    def register(fn: F) -> F:
        key = name or fn.__name__
        existing = REGISTRY.get(key)
        if existing is not None and _origin(existing.fn) != _origin(fn):
            raise ValueError(f"reward function {key!r} is already registered by {_origin(existing.fn)}; "
                             "pick another name")
        setattr(fn, BATCHED_ATTR, batched)
        if check is not None:
            setattr(fn, CHECK_ATTR, check)
        REGISTRY[key] = RewardFunction(key, fn, batched, check, judges)
        return fn

    return register


def batched(fn: F) -> F:
    """Mark a ``module:function`` reward function as batched without registering it."""
    setattr(fn, BATCHED_ATTR, True)
    return fn


def _origin(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _import_reference(name: str) -> Callable[..., Any]:
    module_name, _, attribute = name.partition(":")
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        # a module beside the command, as `python -m engine` and the reward workers (`python -c`) find it; last,
        # so that it shadows nothing installed
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):  # found; what it imports is not
            raise ConfigError(f"reward function {name!r}: module {module_name!r} imports {missing!r}, which is not "
                              "installed here (nor beside the command)") from None
        raise ConfigError(f"reward function {name!r}: cannot import module {module_name!r} ({exc}); "
                          "check the name and that the module is in the current directory or on PYTHONPATH") from None
    except ImportError as exc:  # found, and an import inside it failed (a name its dependency lacks)
        raise ConfigError(f"reward function {name!r}: importing module {module_name!r} raised ImportError: "
                          f"{exc}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"reward function {name!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"reward function {name!r}: {attribute!r} is a {type(target).__name__}, not a function")
    return target


def registered_names() -> list[str]:
    """Names of every registered reward function (the built-ins included)."""
    import engine.rewards.builtins  # noqa: F401  (registers the built-ins)

    return sorted(REGISTRY)


def resolve_reward(name: str) -> RewardFunction:
    """The reward function called ``name``: a registered name or ``package.module:function``."""
    if ":" in name:
        fn = _import_reference(name)
        return RewardFunction(name, fn, bool(getattr(fn, BATCHED_ATTR, False)), getattr(fn, CHECK_ATTR, None))
    names = registered_names()
    if name not in REGISTRY:
        raise ConfigError(f"unknown reward function {name!r}; registered: {', '.join(names)} "
                          "(or give 'package.module:function')")
    return REGISTRY[name]
