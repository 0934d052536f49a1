"""Reward functions the tests name as ``tests.engine.rewards.sample_rewards:<function>``.

A row misbehaves when its metadata says so (``{"misbehave": True}``), so one bad row sits
among good ones.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from engine.rewards import batched, reward_function


def brevity(prompt: str, response: str, metadata: dict[str, Any], limit: int = 10) -> float:
    return 1.0 if len(response) <= limit else 0.0


def raises(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    if metadata.get("misbehave"):
        raise ZeroDivisionError("this row is bad")
    return 1.0


def returns_nan(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    return float("nan") if metadata.get("misbehave") else 1.0


def returns_text(prompt: str, response: str, metadata: dict[str, Any]) -> Any:
    return "high" if metadata.get("misbehave") else 1.0


def sleeps(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    if metadata.get("misbehave"):
        time.sleep(60)
    return 1.0


def ignores_interrupt(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """Hangs where the worker's interrupt cannot reach (as a call stuck in C code would)."""
    if metadata.get("misbehave"):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(60)
    return 1.0


def exits(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    if metadata.get("misbehave"):
        os._exit(3)
    return 1.0


def parts(prompt: str, response: str, metadata: dict[str, Any]) -> dict[str, float]:
    return {"short": float(len(response) < 5), "polite": float("please" in response)}


@batched
def lengths(prompts: list[str], responses: list[str], metadatas: list[dict[str, Any]]) -> list[float]:
    if any(metadata.get("misbehave") for metadata in metadatas):
        return [1.0]  # wrong length
    return [float(len(response)) for response in responses]


@reward_function("sample_batched_parity", batched=True)
def parity(prompts: list[str], responses: list[str], metadatas: list[dict[str, Any]], odd: float = 1.0) -> list[float]:
    return [odd if len(response) % 2 else 0.0 for response in responses]


def signalled(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """A launcher's SIGTERM to the whole process group, arriving while this call runs."""
    if metadata.get("misbehave"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    return 1.0


@reward_function("sample_pid")
def pid(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    return float(os.getpid())


def lambda_holder() -> Any:
    return lambda prompt, response, metadata: 1.0


def raises_always(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    raise KeyError("answer_field")


def returns_nan_always(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    return float("nan")


def two_args(prompt: str, response: str) -> float:
    return 0.0
