"""Chat templates: render a conversation to token ids plus a loss mask.

A template turns messages into *pieces* — text, or markers such as ``<|eot_id|>`` —
and each piece is tokenised on its own, so the mask marks exactly the tokens of
assistant replies (their content and the end-of-turn marker) and nothing else.

Templates (``template=``):

* ``auto`` — the model's own template when the tokenizer carries one (``chat_template`` in
  ``tokenizer_config.json``, ``tokenizer.chat_template`` in a GGUF file), rendered in a
  Jinja sandbox as transformers does (:mod:`engine.data.model_template`); ``plain`` when it
  carries none.
* ``plain`` — ``Role: content\\n`` per turn; an assistant reply ends with EOS.
* ``llama3`` — ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.
* ``chatml`` — ``<|im_start|>role\\ncontent<|im_end|>\\n`` (SmolLM2, Qwen).
* ``nemotron`` — SteerLM / Nemotron-4: ``<extra_id_0>System\\n{system}\\n``, then
  ``<extra_id_1>User\\n{content}\\n`` and ``<extra_id_1>Assistant\\n``, optionally
  ``<extra_id_2>{attributes}\\n``, then ``{content}\\n<extra_id_1>``: the reply ends
  with the ``<extra_id_1>`` that opens the next turn (Nemotron's stop token), so the
  next header does not repeat it.

Special tokens and EOS, explicitly:

* Sequences start with the tokenizer's BOS id when its ``add_bos`` is True (always
  for the byte tokenizer); ``encode`` itself never adds BOS or EOS.
* A marker is one id when the tokenizer defines it as a special token; otherwise an
  *end-of-turn* marker (``<|eot_id|>``, ``<|im_end|>``, the closing ``<extra_id_1>``)
  becomes EOS — so generation can always stop on one id — and any other marker is
  tokenised as its literal text.
* :func:`stop_token_ids` gives the ids that end an assistant reply.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional

# Piece and its constructors live in engine.data.pieces (shared with model_template,
# which would otherwise import this module back); re-exported here.
from engine.data.pieces import Piece as Piece
from engine.data.pieces import _content, _mark
from engine.data.schemas import attribute_string
from engine.data.tokenizers import Tokenizer, adds_bos, special_token_id

ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
TEMPLATES = ("plain", "llama3", "chatml", "nemotron")
Has = Callable[[str], bool]


BOS = Piece("", marker=True)  # resolved to the tokenizer's BOS id (or nothing)
EOS = Piece("", masked=True, marker=True, end_of_turn=True)
_CONSTANT_IDS: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool, bool], list[int]]] = weakref.WeakKeyDictionary()


def _header(template: str, role: str, previous: Optional[str], has: Has) -> list[Piece]:
    if template == "plain":
        return [Piece(ROLE_PREFIX[role])]
    if template == "llama3":
        return [_mark("<|start_header_id|>"), Piece(role), _mark("<|end_header_id|>"), Piece("\n\n")]
    if template == "chatml":
        return [_mark("<|im_start|>"), Piece(f"{role}\n")]
    # nemotron: the previous assistant reply already emitted this turn's <extra_id_1>
    opened = previous == "assistant" and has("<extra_id_1>")
    if role == "system":
        return [_mark("<extra_id_0>"), Piece("System\n")]
    return ([] if opened else [_mark("<extra_id_1>")]) + [Piece("User\n" if role == "user" else "Assistant\n")]


def _body(template: str, role: str, content: str) -> list[Piece]:
    masked = role == "assistant"
    if template == "plain":
        return [_content(content, masked), EOS if masked else Piece("\n")]
    if template == "llama3":
        return [_content(content, masked), _mark("<|eot_id|>", masked, end_of_turn=True)]
    if template == "chatml":
        return [_content(content, masked), _mark("<|im_end|>", masked, end_of_turn=True), Piece("\n")]
    if masked:
        return [_content(content + "\n", True), _mark("<extra_id_1>", True, end_of_turn=True)]
    return [_content(content + "\n")]


def assistant_header(template: str, previous: Optional[str], has: Has,
                     attributes: Optional[dict[str, int] | str] = None) -> list[Piece]:
    """Pieces that open an assistant reply (the generation prompt)."""
    pieces = _header(template, "assistant", previous, has)
    if attributes is not None:
        if template != "nemotron":
            raise ValueError(f"attributes need the nemotron (SteerLM) template, not {template!r}")
        text = attributes if isinstance(attributes, str) else attribute_string(attributes)
        pieces += [_mark("<extra_id_2>"), _content(text + "\n")]
    return pieces


def conversation_pieces(messages: list[dict[str, Any]], template: str, has: Has,
                        attributes: Optional[dict[str, int] | str] = None,
                        generation_prompt: bool = False) -> list[Piece]:
    """All pieces of ``messages``; ``generation_prompt`` appends an assistant header."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    pieces = [BOS]
    previous: Optional[str] = None
    if template == "nemotron" and (not messages or messages[0]["role"] != "system"):
        pieces += _header(template, "system", None, has) + _body(template, "system", "")
        previous = "system"
    for message in messages:
        role = message["role"]
        if role == "assistant":
            pieces += assistant_header(template, previous, has, attributes)
        else:
            pieces += _header(template, role, previous, has)
        pieces += _body(template, role, message["content"])
        previous = role
    if generation_prompt:
        pieces += assistant_header(template, previous, has, attributes)
    return pieces


def _has(tokenizer: Tokenizer) -> Has:
    return lambda text: special_token_id(tokenizer, text) is not None


def _resolve(piece: Piece, tokenizer: Tokenizer) -> list[int]:
    if piece is BOS:
        return [tokenizer.bos_id] if adds_bos(tokenizer) else []
    if piece.marker:
        special = special_token_id(tokenizer, piece.text) if piece.text else None
        if special is not None:
            return [special]
        if piece.end_of_turn:
            return [tokenizer.eos_id]
    return tokenizer.encode(piece.text)


def _constant_cache(tokenizer: Tokenizer) -> dict[tuple[str, bool, bool], list[int]]:
    try:
        return _CONSTANT_IDS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return {}


def tokenize_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of ``pieces`` (markers resolved as in the module docstring)."""
    ids: list[int] = []
    mask: list[int] = []
    cache = _constant_cache(tokenizer)
    for piece in pieces:
        if piece.constant and piece is not BOS:
            key = (piece.text, piece.marker, piece.end_of_turn)
            part = cache.get(key)
            if part is None:
                part = cache[key] = _resolve(piece, tokenizer)
        else:
            part = _resolve(piece, tokenizer)
        ids += part
        mask += [int(piece.masked)] * len(part)
    return ids, mask


def resolve_template(template: str, tokenizer: Tokenizer) -> str:
    """``template``, with ``auto`` resolved: ``model`` when the tokenizer carries a template, else ``plain``."""
    if template != "auto":
        return template
    from engine.data.model_template import model_chat_template

    return "model" if model_chat_template(tokenizer) is not None else "plain"


def _model_pieces(messages: list[dict[str, Any]], tokenizer: Tokenizer, attributes: Any,
                  generation_prompt: bool = False) -> list[Piece]:
    from engine.data.model_template import model_pieces

    if attributes is not None:
        raise ValueError("attributes need the nemotron (SteerLM) template, not the model's own (auto)")
    return model_pieces(messages, tokenizer, generation_prompt)


def render_chat(messages: list[dict[str, Any]], tokenizer: Tokenizer, template: str = "plain",
                attributes: Optional[dict[str, int] | str] = None) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): mask[i] = 1 iff token i belongs to an assistant reply.

    ``attributes`` (dict or ``"helpfulness:4,..."`` string) is written in each
    assistant header; only the ``nemotron`` template supports it.
    """
    template = resolve_template(template, tokenizer)
    if template == "model":
        return tokenize_pieces(_model_pieces(messages, tokenizer, attributes), tokenizer)
    return tokenize_pieces(conversation_pieces(messages, template, _has(tokenizer), attributes), tokenizer)


def render_prompt(messages: list[dict[str, Any]], tokenizer: Tokenizer, template: str = "plain",
                  attributes: Optional[dict[str, int] | str] = None) -> list[int]:
    """Ids of ``messages`` (ending with a user turn) plus the assistant header."""
    template = resolve_template(template, tokenizer)
    if template == "model":
        return tokenize_pieces(_model_pieces(messages, tokenizer, attributes, generation_prompt=True), tokenizer)[0]
    pieces = conversation_pieces(messages, template, _has(tokenizer), attributes, generation_prompt=True)
    return tokenize_pieces(pieces, tokenizer)[0]


def render_reply(content: str, tokenizer: Tokenizer, template: str = "plain") -> list[int]:
    """Ids of one assistant reply up to its end-of-turn (all of them carry loss).

    ``render_prompt(m) + render_reply(c)`` equals ``render_chat(m + [assistant c])``
    without the separator that follows a reply (chatml's newline), so the last id is
    the end-of-response token a reward head reads.
    """
    template = resolve_template(template, tokenizer)
    if template == "model":
        from engine.data.model_template import model_reply_pieces

        return tokenize_pieces(model_reply_pieces(content, tokenizer), tokenizer)[0]
    pieces = _body(template, "assistant", content)
    while pieces and not pieces[-1].masked:
        pieces.pop()
    return tokenize_pieces(pieces, tokenizer)[0]


def render_chat_text(messages: list[dict[str, Any]], template: str = "nemotron",
                     attributes: Optional[dict[str, int] | str] = None, generation_prompt: bool = False) -> str:
    """The template as a string, every marker written out (BOS/EOS omitted)."""
    pieces = conversation_pieces(messages, template, lambda _: True, attributes, generation_prompt)
    return "".join(piece.text for piece in pieces)


def stop_token_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Ids that end an assistant reply under ``template`` (EOS plus the template's marker)."""
    template = resolve_template(template, tokenizer)
    if template == "model":
        from engine.data.model_template import model_stop_markers

        markers = model_stop_markers(tokenizer)
    else:
        markers = [{"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "nemotron": "<extra_id_1>"}.get(template, "")]
    specials = {special_token_id(tokenizer, marker) for marker in markers if marker}
    return sorted({tokenizer.eos_id} | {i for i in specials if i is not None})


def prompt_messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt as messages; HelpSteer's multi-turn strings (``<extra_id_1>`` markers) are split."""
    if isinstance(prompt, list):
        return prompt
    parts = prompt.split("<extra_id_1>")
    messages = [{"role": "user", "content": parts[0].rstrip("\n")}]
    for part in parts[1:]:
        role, _, content = part.partition("\n")
        role = role.strip().lower()
        messages.append({"role": role if role in ("user", "assistant") else "user",
                         "content": content.rstrip("\n") if role in ("user", "assistant") else part})
    return messages


def render_plain(messages: list[dict[str, Any]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Plain template: ``Role: content\\n`` per turn; assistant content ends with EOS.

    Returns (token ids, loss mask) where mask[i] = 1 iff token i belongs to an assistant reply.
    """
    return render_chat(messages, tokenizer, "plain")


def render_text(text: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Plain text: BOS (if the tokenizer adds one) + text + EOS; every token after BOS carries loss."""
    bos = [tokenizer.bos_id] if adds_bos(tokenizer) else []
    ids = bos + tokenizer.encode(text) + [tokenizer.eos_id]
    return ids, [0] * len(bos) + [1] * (len(ids) - len(bos))
