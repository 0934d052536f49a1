"""The model's own chat template (``data.chat_template=auto``), rendered as transformers does.

A tokenizer may carry the Jinja template shipped with its model (``chat_template`` in
``tokenizer_config.json`` or a ``chat_template.jinja`` beside it, ``tokenizer.chat_template``
in a GGUF file). It is untrusted code, so it runs in Jinja's
``ImmutableSandboxedEnvironment`` with the settings and helpers of transformers'
``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``,
``raise_exception``, ``strftime_now``, a ``{% generation %}`` tag that renders its body).
Its variables: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``pad_token``.

How the text becomes ids and a loss mask:

* The template is rendered twice: once with each message's content replaced by a
  placeholder, once with the real content. The placeholder rendering shows which text the
  template writes (headers, markers, default system turns) and where each message's
  content goes; the real rendering is then matched piece by piece (content the template
  trims is found as such). A template that rewrites content in any other way is refused
  with a message that names another template to use.
* Template text is split at the tokenizer's special-token strings, which become their
  ids; the rest is tokenised as text. **Message content is always plain text**: a user
  message that contains ``<|im_end|>`` gets the ids of those characters, never the
  control token (transformers, which tokenises the rendered string, would emit it, so a
  user could close a turn from inside the data).
* Text between two special tokens is tokenised in one go, as transformers does, except at
  the start and end of an assistant reply: there the ids are cut, so the end of a prompt is
  always a token boundary (prompt ids + reply ids = conversation ids). This equals
  transformers' ids except where the text on both sides of such a seam forms one
  pre-token, e.g. a reply that starts with two spaces.
* No BOS is added: as in ``apply_chat_template``, only a BOS the template writes is there.
* The mask covers each assistant message's content and the end-of-turn marker after it:
  the first special token that follows the content with only whitespace in between
  (``<|im_end|>`` for SmolLM2). Template text around them (headers, the newline after
  ``<|im_end|>``) carries no loss.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from datetime import datetime
from typing import Any, Optional

from engine.data.pieces import Piece, _content, _mark
from engine.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never in a template
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_PROBE = "\ue002"  # a user turn for rendering a reply without its conversation


def model_chat_template(tokenizer: Tokenizer) -> Optional[str]:
    """The Jinja chat template ``tokenizer`` carries, or None."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def _environment() -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes (as transformers does)."""

        def __setitem__(self, name: str, value: Any) -> None:
            if name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    logger.info("data.chat_template=auto: rendering the model's own chat template (%d characters)", len(source))
    return _environment().from_string(source)


def _token_names(tokenizer: Tokenizer) -> dict[str, str]:
    names = {i: text for text, i in (getattr(tokenizer, "special_tokens", {}) or {}).items()}
    return {f"{key}_token": names.get(int(getattr(tokenizer, f"{key}_id", -1)), "") for key in ("bos", "eos", "pad")}


def render_text(source: str, messages: list[dict[str, Any]], tokenizer: Tokenizer,
                generation_prompt: bool = False) -> str:
    """The template rendered to text, as ``apply_chat_template(..., tokenize=False)`` does."""
    return str(_compiled(source).render(messages=messages, add_generation_prompt=generation_prompt,
                                        **_token_names(tokenizer)))


def _content_as_rendered(rendered: str, position: int, content: str, after: str) -> str:
    """``content`` as the template wrote it at ``position`` (as is, or trimmed), followed by ``after``."""
    for candidate in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
        if rendered.startswith(candidate + after, position):
            return candidate
    raise ValueError("data.chat_template=auto: the model's chat template rewrites message content (beyond trimming "
                     "whitespace), so Keel cannot tell the content from the template's text; set data.chat_template "
                     "to one of plain, llama3, chatml, nemotron")


def _segments(source: str, messages: list[dict[str, Any]], tokenizer: Tokenizer,
              generation_prompt: bool) -> list[tuple[str, Optional[int]]]:
    """The rendered conversation as (text, index of the message whose content it is, or None for template text)."""
    marked = [{**message, "content": _PLACEHOLDER.format(i)} for i, message in enumerate(messages)]
    parts = _PLACEHOLDER_RE.split(render_text(source, marked, tokenizer, generation_prompt))
    rendered = render_text(source, messages, tokenizer, generation_prompt)
    segments: list[tuple[str, Optional[int]]] = []
    position = 0
    for k in range(0, len(parts), 2):
        template_text = parts[k]
        if not rendered.startswith(template_text, position):
            raise ValueError("data.chat_template=auto: the model's chat template renders differently depending on "
                             "the message content; set data.chat_template to one of plain, llama3, chatml, nemotron")
        segments.append((template_text, None))
        position += len(template_text)
        if k + 1 < len(parts):
            index = int(parts[k + 1])
            content = _content_as_rendered(rendered, position, str(messages[index]["content"]), parts[k + 2])
            segments.append((content, index))
            position += len(content)
    if position != len(rendered):
        raise ValueError("data.chat_template=auto: could not match the model's chat template to its output")
    return segments


def _special_pattern(tokenizer: Tokenizer) -> Optional[re.Pattern[str]]:
    """A regex that splits text at the tokenizer's special-token strings (longest first)."""
    return _compiled_specials(tuple(sorted(getattr(tokenizer, "special_tokens", {}) or {}, key=lambda t: (-len(t), t))))


@functools.lru_cache(maxsize=8)
def _compiled_specials(specials: tuple[str, ...]) -> Optional[re.Pattern[str]]:
    alternatives = [re.escape(s) for s in specials if s]
    return re.compile("(" + "|".join(alternatives) + ")") if alternatives else None


def _template_pieces(text: str, pattern: Optional[re.Pattern[str]]) -> list[Piece]:
    parts = pattern.split(text) if pattern is not None else [text]
    pieces = []
    for k, part in enumerate(parts):
        if part:
            pieces.append(_mark(part) if k % 2 else Piece(part))
    return pieces


def _mask_end_of_turn(pieces: list[Piece], start: int) -> None:
    """Mask the first marker after ``start`` (and the whitespace before it) when only whitespace precedes it."""
    for k in range(start, len(pieces)):
        piece = pieces[k]
        if piece.marker:
            for j in range(start, k + 1):
                pieces[j] = pieces[j]._replace(masked=True, end_of_turn=j == k)
            return
        if piece.text.strip() or not piece.constant:
            return


def model_pieces(messages: list[dict[str, Any]], tokenizer: Tokenizer, generation_prompt: bool = False) -> list[Piece]:
    """Pieces of ``messages`` under the tokenizer's own template (see the module docstring)."""
    source = model_chat_template(tokenizer)
    if source is None:
        raise ValueError("the tokenizer carries no chat template; set data.chat_template to one of "
                         "plain, llama3, chatml, nemotron")
    pattern = _special_pattern(tokenizer)
    pieces: list[Piece] = []
    reply_ends: list[int] = []
    for text, index in _segments(source, messages, tokenizer, generation_prompt):
        if index is None:
            pieces += _template_pieces(text, pattern)
        elif messages[index]["role"] == "assistant":
            pieces.append(_content(text, masked=True))
            reply_ends.append(len(pieces))
        else:
            pieces.append(_content(text))
    for start in reply_ends:
        _mask_end_of_turn(pieces, start)
    return _merge_unmasked_text(pieces)


def _merge_unmasked_text(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring unmasked text pieces, so that text around non-assistant content is
    tokenised in one go, as transformers does (the seams that stay are masked content and markers)."""
    merged: list[Piece] = []
    for piece in pieces:
        previous = merged[-1] if merged else None
        if previous is not None and not (piece.marker or piece.masked or previous.marker or previous.masked):
            merged[-1] = Piece(previous.text + piece.text, constant=previous.constant and piece.constant)
        else:
            merged.append(piece)
    return merged


def model_reply_pieces(content: str, tokenizer: Tokenizer) -> list[Piece]:
    """The pieces of one assistant reply up to its end-of-turn marker (all masked).

    Rendered after a one-turn user prompt and cut out of it, so that ``prompt pieces +
    reply pieces`` equals the conversation up to the end of the reply.
    """
    messages = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": content}]
    pieces = model_pieces(messages, tokenizer)
    first = next(k for k, piece in enumerate(pieces) if piece.masked)
    last = max(k for k, piece in enumerate(pieces) if piece.masked)
    return pieces[first: last + 1]


def model_stop_markers(tokenizer: Tokenizer) -> list[str]:
    """Special-token strings that end an assistant reply under the tokenizer's own template."""
    return [piece.text for piece in model_reply_pieces("ok", tokenizer) if piece.marker]
