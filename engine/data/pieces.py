"""Chat-template pieces: the tokenisation units of :mod:`engine.data.chat`.

Shared by :mod:`engine.data.chat` and :mod:`engine.data.model_template`; they live here
so that model_template, which chat imports to render a model's own template, need not
import chat back: that would be an import cycle. ``engine.data.chat`` re-exports them.
"""

from __future__ import annotations

from typing import NamedTuple


class Piece(NamedTuple):
    """One tokenisation unit. ``marker`` pieces are special tokens (see :mod:`engine.data.chat`);
    ``constant`` pieces (template text, not message content) have their ids cached."""

    text: str
    masked: bool = False
    marker: bool = False
    end_of_turn: bool = False
    constant: bool = True


def _content(text: str, masked: bool = False) -> Piece:
    return Piece(text, masked, constant=False)


def _mark(text: str, masked: bool = False, end_of_turn: bool = False) -> Piece:
    return Piece(text, masked=masked, marker=True, end_of_turn=end_of_turn)
