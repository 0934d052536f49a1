"""The generation backend interface: ``update_weights`` → ``generate`` → ``release``.

Online RL and the sample-and-train recipes call a backend every iteration: the trainer's
weights are resharded into it (:mod:`engine.generation.reshard`), it generates rollouts
for a batch of prompts, and it frees its memory before training resumes. Backends
register by name and are imported only when selected, so importing Keel never imports
TensorRT-LLM:

* ``native`` (:mod:`engine.generation.native`): the megatron model with a KV cache, under
  its own tensor-parallel size; runs on CPU and GPU and is the reference;
* ``trtllm`` (:mod:`engine.generation.trtllm`): TensorRT-LLM, where it is installed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from engine.errors import ConfigError

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature`` 0 is greedy.

    ``stop_token_ids`` end a row (the stop token is kept in the output, as EOS is);
    ``seed`` seeds the draws of the whole call, and row ``i`` of the call draws from
    ``seed + i`` so a row's sample does not depend on the rows batched with it.
    ``max_length`` caps prompt + new tokens (the model's context); 0 means no cap beyond
    ``max_new_tokens``. ``vocab_size`` (0 = the model's) keeps draws among the tokenizer's ids
    when the model's vocabulary is padded beyond it; log-probs stay those of the whole vocabulary.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    max_length: int = 0
    vocab_size: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_length < 0:
            problems.append(f"max_length={self.max_length} must be >= 0")
        if self.vocab_size < 0:
            problems.append(f"vocab_size={self.vocab_size} must be >= 0")
        if problems:
            raise ConfigError("sampling: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "sampling") -> SamplingParams:
        """Build from user options, refusing unknown names (a typo must not fall back to a default)."""
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(values)
        if "stop_token_ids" in values:
            values["stop_token_ids"] = tuple(int(t) for t in values["stop_token_ids"])
        return cls(**values)


@dataclass
class Rollouts:
    """What one ``generate`` call returns, one entry per prompt, in prompt order.

    ``tokens[i]`` are the new token ids (stop token included when one ended the row),
    ``logprobs[i][t]`` the log-probability of ``tokens[i][t]`` under the model's raw
    (temperature 1, unfiltered) distribution, the quantity the trainer recomputes;
    ``finish_reasons[i]`` is ``"stop"`` or ``"length"``.
    """

    prompts: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def sequences(self) -> list[list[int]]:
        """Prompt followed by its generated tokens, per row."""
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]


class GenerationBackend(Protocol):
    """What every backend provides (verl's rollout interface)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load weights given as (global parameter name, this rank's generation-layout slice)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        """Complete every prompt; rows of mixed lengths are batched together."""

    def release(self) -> None:
        """Free the KV cache and any engine memory before training resumes."""


_BACKENDS: dict[str, str] = {
    "native": "engine.generation.native:NativeBackend",
    "trtllm": "engine.generation.trtllm:TRTLLMBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``module:Class`` under ``name``; the module is imported only when the backend is built."""
    _BACKENDS[name] = target


def backend_class(name: str) -> Any:
    """The backend class registered as ``name`` (importing its module now)."""
    if name not in _BACKENDS:
        raise ConfigError(f"unknown generation backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    module, _, attr = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_prompts(prompts: list[list[int]], params: SamplingParams, context: Optional[int],
                  names: Optional[list[str]] = None, option: str = "max_length") -> None:
    """One clear error, before any work, for empty prompts or prompts that leave no room to generate.

    ``names[i]`` says where prompt ``i`` came from (``file:line``); the default is its index. A prompt that
    fills the model's ``context`` can only be shortened; one that fills ``params.max_length`` below it is told
    to raise ``option``, the setting the caller reads it from.
    """
    within = f"{option} {params.max_length}; shorten the prompt or raise {option}"
    if context:
        within += f" (at most the model's context of {context} tokens)"
    for i, prompt in enumerate(prompts):
        where = names[i] if names else f"prompt {i}"
        if not prompt:
            raise ConfigError(f"{where}: the prompt is empty")
        no_room = f"{where}: the prompt has {len(prompt)} tokens, which leaves no room to generate within "
        if context and len(prompt) >= context:
            raise ConfigError(f"{no_room}the model's context of {context} tokens; shorten the prompt")
        if params.max_length and len(prompt) >= params.max_length:
            raise ConfigError(no_room + within)
