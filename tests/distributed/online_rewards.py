"""Reward functions for the online-RL tests: one that varies on any policy's text, and misbehaving ones."""

from __future__ import annotations

import time
from typing import Any


def digit_share(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """Share of digits among the response's characters: varies even for an untrained policy."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def flaky(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """Raises on some responses, returns NaN on others, hangs on a few (past any sane timeout)."""
    kind = len(response) % 7
    if kind == 1:
        raise ValueError("flaky reward: cannot score this response")
    if kind == 2:
        return float("nan")
    if kind == 3:
        time.sleep(30)
    return 1.0


def refuses(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """Fails on every response (with ``on_error: raise`` the run ends at its first scoring)."""
    raise ValueError("refuses to score anything")
