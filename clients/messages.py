"""Plain-Python results and the request builder shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deltaserve.v1 import generation_pb2 as pb

_FINISH_PREFIX = "FINISH_REASON_"


@dataclass
class GenerationResult:
    """A finished generation: the whole text, its tokens and why it stopped."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    # "length", "eos", "stop_sequence", "cancelled" (or "unspecified").
    finish_reason: str = "unspecified"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int = 0
    logprobs: list[float] = field(default_factory=list)
    stop_sequence: str = ""
    adapter_id: str = ""
    adapter_version: int = 0   # the adapter version it ran on (0: none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenChunk:
    """Tokens streamed since the previous chunk, with the complete UTF-8 text they finish."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


StreamEvent = TokenChunk | GenerationResult


def finish_reason_name(value: int) -> str:
    """`FINISH_REASON_STOP_SEQUENCE` -> "stop_sequence"."""
    try:
        name = pb.FinishReason.Name(value)
    except ValueError:
        # A newer server may send a reason this client's stubs don't know yet.
        return f"unknown_{value}"
    return name.removeprefix(_FINISH_PREFIX).lower()


def result_from_pb(response: pb.GenerateResponse) -> GenerationResult:
    return GenerationResult(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason_name(response.finish_reason),
        prompt_tokens=response.prompt_tokens,
        generated_tokens=response.generated_tokens,
        seed=response.seed,
        logprobs=list(response.logprobs),
        stop_sequence=response.stop_sequence,
        adapter_id=response.adapter_id,
        adapter_version=response.adapter_version,
    )


def event_from_pb(message: pb.GenerateStreamResponse) -> StreamEvent:
    kind = message.WhichOneof("event")
    if kind == "final":
        return result_from_pb(message.final)
    if kind == "token":
        token = message.token
        return TokenChunk(token_ids=list(token.token_ids), text=token.text, logprobs=list(token.logprobs))
    raise ValueError(f"stream event has no payload (got {kind!r})")


def _chat_prompt(messages: Sequence[Mapping[str, str]]) -> pb.ChatPrompt:
    if not messages:
        raise ValueError("messages must not be empty")
    converted = []
    for index, message in enumerate(messages):
        try:
            converted.append(pb.ChatMessage(role=message["role"], content=message["content"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"messages[{index}] needs string 'role' and 'content' keys: {exc}") from exc
    return pb.ChatPrompt(messages=converted)


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    adapter: str = "",
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """Builds a GenerateRequest; exactly one of `prompt` (raw text) or `messages` (chat) must be given."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (raw text) or messages (chat)")
    sampling = pb.SamplingParameters(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty
    )
    if seed is not None:
        sampling.seed = seed
    stopping = pb.StoppingCriteria(
        max_new_tokens=max_new_tokens, stop_sequences=list(stop or ()), ignore_eos=ignore_eos
    )
    request = pb.GenerateRequest(
        adapter_id=adapter,
        sampling=sampling,
        stopping=stopping,
        return_logprobs=logprobs,
        request_id=request_id,
    )
    if prompt is not None:
        request.text = prompt
    else:
        assert messages is not None
        request.chat.CopyFrom(_chat_prompt(messages))
    return request
