"""Prompt rendering shared by QA, SFT and chat: passages as escaped ``<doc>`` tags, the
decoder's chat template, and the tokenizer that reads a templated prompt."""

from __future__ import annotations

import copy as _copy
import re

from refrag.modeling.tokenization import RefragTokenizer

_DOC_TAG = re.compile(r"<(/?doc\b)")


def escape_doc_text(text: str) -> tuple[str, int]:
    """``text`` with every ``<doc``/``</doc`` written as ``&lt;doc``/``&lt;/doc``, so a file
    is always data inside its own ``<doc>``, never markup; and how many tags were escaped."""
    return _DOC_TAG.subn(r"&lt;\1", text)


def doc_tag(text: str, doc_id: str) -> str:
    """``text`` as a ``<doc>`` with id ``doc_id``: doc tags in the text escaped (see
    :func:`escape_doc_text`), quotes and brackets in the id replaced by ``_``."""
    body, _ = escape_doc_text(text)
    safe_id = re.sub(r"['\"<>&]", "_", doc_id)
    return f"<doc id='{safe_id}'>{body}</doc>"


def render_chat(decoder_tokenizer, messages: list[dict[str, str]]) -> str:
    """A conversation as one text, ready for the assistant's next message: the decoder's chat
    template when it has one, else ``Role: content`` lines ending in ``Assistant:``."""
    if getattr(decoder_tokenizer, "chat_template", None):
        return decoder_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def template_tokenizer(tok: RefragTokenizer) -> RefragTokenizer:
    """``tok``, or a copy without the BOS it adds where the decoder has a chat template (the
    template opens the sequence itself), as :class:`ChatSession` reads prompts."""
    if not getattr(tok.decoder_tokenizer, "chat_template", None) or not tok.add_bos:
        return tok
    copy = _copy.copy(tok)
    copy.add_bos = False
    return copy
