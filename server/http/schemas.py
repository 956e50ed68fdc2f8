"""OpenAI request bodies as pydantic models. Unknown fields are refused (extra="forbid"), so a parameter we do not
implement is a 400 that names it; the few OpenAI parameters declared here only to accept their neutral value
(presence_penalty 0, echo false, ...) are checked in translate.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16        # n per prompt
MAX_PROMPTS = 64        # prompts in one /v1/completions list


class Body(BaseModel):
    """A JSON object that refuses fields it does not declare."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    """`stream_options`: only include_usage (a last chunk with the usage and no choices)."""

    include_usage: bool = False


class SamplingFields(Body):
    """What /v1/completions and /v1/chat/completions share: the model, sampling, stopping and streaming."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)    # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None                                   # an end-user id; accepted, not used
    presence_penalty: float | None = None                     # only 0
    frequency_penalty: float | None = None                    # only 0
    logit_bias: dict[str, float] | None = None                # only empty
    # Extensions, as vLLM accepts them.
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, ge=-1)            # -1 or 0: no top-k


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0)          # the legacy API's count of alternatives
    echo: bool = False                                        # only false
    best_of: int | None = Field(default=None, ge=1)           # only n (or unset)
    suffix: str | None = None                                 # only empty


class TextPart(Body):
    """One part of a message's content; only text parts are served."""

    type: Literal["text"]
    text: str


class ChatMessage(Body):
    """One chat message; its content is a string or text parts (joined)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(Body):
    """Only {"type": "text"} (what no response_format means); schemas and JSON mode are refused."""

    type: str


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None


class LoadAdapterBody(Body):
    """POST /v1/adapters: serve the directory `path` as `name` (a new version if `name` is served)."""

    name: str
    path: str
    pinned: bool = False
