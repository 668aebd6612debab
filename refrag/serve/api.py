"""The OpenAI chat-completions wire format that ``refrag serve`` reads and answers: the
request body (the fields read; others ignored), errors as ``{"error": {…}}``, the limits on a
request, and the retriever protocol behind the ``retrieve`` extra field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class Passage(Protocol):
    """What a retriever returns: a passage's text (``doc_id`` is used when present)."""

    text: str


class Retriever(Protocol):
    """Anything with ``search(query, n)`` (e.g. ``refrag.retrieval.PassageIndex``)."""

    def search(self, query: str, n: int) -> Sequence[Passage]: ...


@dataclass
class ServeLimits:
    """What one request may ask for; past a limit the answer is a 4xx naming it."""

    max_request_bytes: int = 4_000_000  # the HTTP body
    max_documents: int = 64  # <doc> passages in the rendered prompt (retrieved ones included)
    max_prompt_positions: int = 8192  # decoder positions of the prompt (a chunk is one)
    max_chunk_rows: int = 16_384  # encoder rows (k tokens each) of the prompt
    max_new_tokens: int = 1024  # max_tokens / max_completion_tokens
    max_retrieve: int = 32  # the retrieve field
    max_pending: int = 256  # requests waiting or running; more get 429


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions body that this server reads (others ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    retrieve: int | None = None  # extra: prepend the top-n retrieved passages
    ignore_eos: bool = False  # extra: always generate max_tokens tokens


def message_role(role: str) -> str:
    return "system" if role == "developer" else role


def message_text(message: ChatMessage) -> str:
    """A message's text; a part other than text is refused."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    for part in message.content:
        if part.type != "text":
            raise ApiError(400, f"content part of type {part.type!r} is not supported",
                           "unsupported_value", "messages")  # fmt: skip
    return "".join(part.text or "" for part in message.content)
