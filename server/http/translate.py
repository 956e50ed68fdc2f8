"""OpenAI JSON bodies -> the same domain GenerationRequests the gRPC service builds (server/service/convert.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from server.engine.request import GenerationRequest, SamplingParams
from server.http.errors import ApiError, unsupported
from server.http.schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, SamplingFields

COMPLETIONS_DEFAULT_MAX_TOKENS = 16    # OpenAI's default for /v1/completions; chat: the server's default
SEED_RANGE = 2**63
ROLES = {"developer": "system"}        # OpenAI's newer name for the system role


@dataclass(frozen=True)
class Job:
    """One HTTP generation: its engine requests (prompt-major, then choice) and how to answer."""

    kind: str                          # "completion" or "chat"
    id: str
    model: str                         # as the client named it, echoed in every answer
    requests: list[GenerationRequest]
    n: int                             # choices per prompt
    stream: bool
    include_usage: bool
    top_logprobs: int | None           # None: no logprobs; k: the chosen token's logprob and k alternatives


def resolve_model(model: str, base_id: str) -> str:
    """The adapter a `model` names ("" for the base): the base id, an adapter name, or 'base:adapter'."""
    if model == base_id:
        return ""
    if model.startswith(base_id + ":"):
        return model[len(base_id) + 1:]
    return model


def _check_neutral(body: SamplingFields) -> None:
    """OpenAI parameters accepted only at the value that changes nothing."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "only 0 (use repetition_penalty)")
    if body.logit_bias:
        raise unsupported("logit_bias", "only an empty map")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _sampling(body: SamplingFields, choice: int) -> SamplingParams:
    seed = body.seed
    if seed is not None and body.n > 1:
        # Each choice its own reproducible draw: seed, seed + 1, ...
        seed = (seed + choice) % SEED_RANGE if seed >= 0 else seed
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=seed,
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _requests(body: SamplingFields, prompts: list[str | None], messages: tuple[tuple[str, str], ...] | None,
              max_tokens: int, top_logprobs: int | None, base_id: str, job_id: str) -> list[GenerationRequest]:
    adapter = resolve_model(body.model, base_id)
    return [
        GenerationRequest(
            request_id=f"{job_id}-{p}-{c}", prompt=prompt, messages=messages, adapter_id=adapter,
            sampling=_sampling(body, c), max_new_tokens=max_tokens, stop_sequences=_stops(body.stop),
            ignore_eos=body.ignore_eos, return_logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0)
        for p, prompt in enumerate(prompts) for c in range(body.n)
    ]


def _check_top_logprobs(value: int | None, param: str, limit: int) -> None:
    if value is not None and value > limit:
        raise ApiError(400, f"{param} must be at most {limit} (the server's --max-top-logprobs), got {value}",
                       param=param)


def completion_job(body: CompletionRequest, base_id: str, max_top_logprobs: int) -> Job:
    """POST /v1/completions: one choice per prompt (n each)."""
    _check_neutral(body)
    if body.echo:
        raise unsupported("echo", "the prompt is not repeated in the answer")
    if body.best_of is not None and body.best_of != body.n:
        raise unsupported("best_of", "only equal to n (every sequence is returned)")
    if body.suffix:
        raise unsupported("suffix", "insertion is not served")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}", param="prompt")
    _check_top_logprobs(body.logprobs, "logprobs", max_top_logprobs)
    job_id = f"cmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    requests = _requests(body, list(prompts), None, max_tokens, body.logprobs, base_id, job_id)
    return Job("completion", job_id, body.model, requests, body.n, body.stream,
               bool(body.stream_options and body.stream_options.include_usage), body.logprobs)


def chat_job(body: ChatCompletionRequest, base_id: str, max_top_logprobs: int) -> Job:
    """POST /v1/chat/completions: the messages rendered by the model's chat template (in the engine)."""
    _check_neutral(body)
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported("response_format", "only {\"type\": \"text\"}; JSON modes and schemas are not served")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    _check_top_logprobs(body.top_logprobs, "top_logprobs", max_top_logprobs)
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: give one", param="max_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens or 0     # 0: the server's default
    messages = tuple((ROLES.get(m.role, m.role), m.text()) for m in body.messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    job_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = _requests(body, [None], messages, max_tokens, top, base_id, job_id)
    return Job("chat", job_id, body.model, requests, body.n, body.stream,
               bool(body.stream_options and body.stream_options.include_usage), top)
