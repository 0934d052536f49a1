"""Configuration of one reward function, usable as a list field of an algorithm's config section.

In YAML::

    grpo:
      reward_functions:
        - {name: math_answer, weight: 1.0}
        - {name: regex_format, weight: 0.2, kwargs: {pattern: '\\\\boxed\\{'}, on_error: skip}
        - {name: my_pkg.rewards:brevity, weight: 0.1, timeout_seconds: 2}

An algorithm config declares ``reward_functions: list[RewardFunctionConfig]`` and converts
the parsed dicts in its ``__post_init__`` with :func:`parse_reward_configs` (which names
the field and index in every error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

ON_ERROR = ("zero", "skip", "raise")


@dataclass
class RewardFunctionConfig:
    name: str = field(metadata={"doc": (
        "Reward function: a registered name (synthetic_check, math_answer, regex_format, length_penalty, or "
        "one registered with @engine.rewards.reward_function) or 'package.module:function'.")})
    weight: float = field(default=1.0, metadata={"doc": (
        "Weight of this component in the total reward (0 = logged only; negative allowed).")})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"doc": (
        "Keyword arguments passed to the function on every call, e.g. {pattern: ...} for regex_format.")})
    timeout_seconds: float = field(default=5.0, metadata={"doc": (
        "Longest one call may take (one row; a batched function's call covers a chunk of rows); a call "
        "past it is abandoned (its worker replaced if it does not stop) and handled per on_error.")})
    on_error: str = field(default="zero", metadata={"doc": (
        "A call that raises, times out or returns NaN/inf/a non-number: 'zero' scores the component 0.0, "
        "'skip' drops the row from training, 'raise' stops the run with the row and the error. With 'zero', a "
        "function that fails on every row of a batch stops the run too: it is broken, not unlucky.")})
    label: Optional[str] = field(default=None, metadata={"doc": (
        "Name the component is reported under (default: name); needed when one function is listed twice.")})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"reward function name={self.name!r} must be a non-empty string")
        if ":" in self.name:
            module, _, attribute = self.name.partition(":")
            if not all(part.isidentifier() for part in module.split(".") + attribute.split(".")):
                raise ConfigError(f"reward function name={self.name!r}: write 'package.module:function'")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"reward function {self.name!r}: weight={self.weight!r} must be a finite number")
        if not isinstance(self.kwargs, dict) or not all(isinstance(key, str) for key in self.kwargs):
            raise ConfigError(f"reward function {self.name!r}: kwargs={self.kwargs!r} must be a mapping of "
                              "argument names to values")
        if (isinstance(self.timeout_seconds, bool) or not isinstance(self.timeout_seconds, (int, float))
                or not 0 < self.timeout_seconds < math.inf):
            raise ConfigError(f"reward function {self.name!r}: timeout_seconds={self.timeout_seconds!r} must be "
                              "a number > 0")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"reward function {self.name!r}: on_error={self.on_error!r} is not one of "
                              f"{', '.join(map(repr, ON_ERROR))} (zero: score 0.0; skip: drop the row; "
                              "raise: stop)")
        if self.label is not None and (not isinstance(self.label, str) or not self.label.strip()):
            raise ConfigError(f"reward function {self.name!r}: label={self.label!r} must be a non-empty string")

    @property
    def component(self) -> str:
        """The name this function's values are reported under."""
        return self.label or self.name


def check_unique(configs: Sequence[RewardFunctionConfig], where: str = "reward functions") -> None:
    """Raise :class:`ConfigError` when two functions would be reported under the same component name."""
    seen: set[str] = set()
    for config in configs:
        if config.component in seen:
            raise ConfigError(f"{where}: {config.component!r} is listed twice; give each a distinct 'label'")
        seen.add(config.component)


def parse_reward_configs(value: Any, where: str = "reward_functions") -> list[RewardFunctionConfig]:
    """``value`` (a list of mappings, as YAML gives, or of :class:`RewardFunctionConfig`) as configs.

    ``where`` is the field's dotted name (e.g. ``grpo.reward_functions``) used in every error,
    which names the entry (``grpo.reward_functions[1].weight``) and what to change.
    """
    from engine.config import from_dict  # not at import: engine.config may import this module

    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of {{name, weight, kwargs, ...}} entries, got {value!r}")
    configs = []
    for index, item in enumerate(value):
        if isinstance(item, RewardFunctionConfig):
            configs.append(item)
        elif isinstance(item, dict):
            if "name" not in item:
                squashed = next((k for k in item if isinstance(k, str) and k.startswith("name:")), None)
                hint = f"; YAML needs a space after the colon: {{name: {squashed[5:]}}}" if squashed else ""
                raise ConfigError(f"{where}[{index}]: missing 'name' (a registered reward function or "
                                  f"'package.module:function'){hint}")
            configs.append(from_dict(RewardFunctionConfig, item, f"{where}[{index}]"))
        else:
            raise ConfigError(f"{where}[{index}] must be a mapping like {{name: math_answer, weight: 1.0}}, "
                              f"got {item!r}")
    check_unique(configs, where)
    check_registered(configs, where)
    return configs


def check_registered(configs: Sequence[RewardFunctionConfig], where: str) -> None:
    """An unknown reward name is refused with the config, not after the models are built. A list with a
    ``module:function`` entry is left to the run: importing that module (rank 0 only) may register names."""
    if any(":" in config.name for config in configs):
        return
    from engine.rewards.registry import resolve_reward

    for index, config in enumerate(configs):
        try:
            resolve_reward(config.name)
        except ConfigError as exc:
            raise ConfigError(f"{where}[{index}]: {exc}") from None


def check_judged(configs: Sequence[RewardFunctionConfig], rows: Sequence[Any], on_error: str = "raise") -> list[Any]:
    """The prompt ``rows`` (:class:`engine.data.prompts.PromptRow`) each configured reward function can judge.

    A file (``row.where.source``, each checked on its own) of which a function can judge no row is refused
    (``synthetic_check`` on prompts without a built-in task, ``math_answer`` on rows without the reference its
    ``answer_key`` names; each function judges with its configured kwargs):
    every sample would score alike and nothing would be learned. Rows it cannot judge among others are bad rows
    by ``data.on_error``: ``raise`` refuses the first, ``skip`` leaves them out and counts them. Kept, they got no
    reward, and an iteration that drew only such rows stopped the run."""
    from engine.data.errors import DataError
    from engine.rewards.registry import resolve_reward

    by_source: dict[str, list[Any]] = {}
    for row in rows:
        by_source.setdefault(row.where.source if row.where else "<data>", []).append(row)
    unjudged: set[int] = set()
    for config in configs:
        if ":" in config.name:  # a module:function reference declares nothing (and is imported on rank 0 only)
            continue
        judges = resolve_reward(config.name).row_check(config.kwargs)
        if judges is None:
            continue
        for source, group in by_source.items():
            failing = [(row, found) for row in group if (found := judges(row.text, row.reward_metadata()))]
            if not failing:
                continue
            (row, (name, needs)), none = failing[0], len(failing) == len(group)
            what = (f"reward function {config.name!r} can judge none of the {len(group)} prompts of {source}" if none
                    else f"reward function {config.name!r} cannot judge {len(failing)} of the {len(group)} prompts "
                    f"of {source}")
            if none or on_error != "skip":
                raise DataError(row.where, name, needs, row.text if name == "prompt" else None, source=source,
                                hint=what + (", so every sample would score alike; use prompts it can check or another "
                                             "reward function" if none else ": their samples would get no reward from "
                                             "it; give them what it needs, or set data.on_error=skip to leave them out"))
            logger.warning("%s (first: %s, field %r: expected %s); data.on_error=skip leaves them out", what,
                           row.where, name, needs)
            unjudged.update(id(row) for row, _ in failing)
    return [row for row in rows if id(row) not in unjudged]
