"""Engine results -> OpenAI JSON: whole answers, streamed chunks, usage and logprobs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from server.engine.prompts import PromptEncoder
from server.engine.request import FinishReason, GenerationResult, RequestOutput, TopLogprobs
from server.http.translate import Job

# A request cancelled by the server (shutdown past its grace period, a failed engine step) ends with "abort", as
# in vLLM; OpenAI has no such reason.
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop",
                  FinishReason.CANCELLED: "abort"}
DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class TokenText:
    """The text of single tokens, for logprobs (cached: a vocabulary's worth at most). A token that is part of a
    multi-byte character decodes to U+FFFD, as with other servers."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._encoder.decode([token_id])
        return text


TextOf = Callable[[int], str]


def completion_logprobs(token_ids: list[int], logprobs: list[float], tops: list[TopLogprobs], text_of: TextOf,
                        offset: int) -> tuple[dict[str, Any], int]:
    """The legacy API's logprobs object for these tokens, whose text starts at `offset`; and the next offset."""
    tokens = [text_of(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [{text_of(t): lp for t, lp in alternatives} for alternatives in tops] if tops else [None] * len(tokens)
    return {"tokens": tokens, "token_logprobs": logprobs[:len(tokens)], "top_logprobs": top,
            "text_offset": offsets}, offset


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(token_ids: list[int], logprobs: list[float], tops: list[TopLogprobs],
                  text_of: TextOf) -> dict[str, Any]:
    """The chat API's logprobs object: one entry per token, each with its top alternatives."""
    content = []
    for i, (token, logprob) in enumerate(zip(token_ids, logprobs, strict=False)):
        entry = _chat_token(text_of(token), logprob)
        alternatives = tops[i] if i < len(tops) else []
        entry["top_logprobs"] = [_chat_token(text_of(t), lp) for t, lp in alternatives]
        content.append(entry)
    return {"content": content, "refusal": None}


def usage(job: Job, prompt_tokens: list[int], completion_tokens: int) -> dict[str, int]:
    """Each prompt counted once however many choices it has (prompt_tokens: one entry per choice)."""
    prompts = sum(prompt_tokens[::job.n])
    return {"prompt_tokens": prompts, "completion_tokens": completion_tokens,
            "total_tokens": prompts + completion_tokens}


def _logprobs_of(job: Job, result: GenerationResult, text_of: TextOf) -> dict[str, Any] | None:
    if job.top_logprobs is None:
        return None
    if job.kind == "chat":
        return chat_logprobs(result.token_ids, result.logprobs, result.top_logprobs, text_of)
    return completion_logprobs(result.token_ids, result.logprobs, result.top_logprobs, text_of, 0)[0]


def answer(job: Job, results: list[GenerationResult], created: int, text_of: TextOf) -> dict[str, Any]:
    """The whole (non-streamed) answer, one choice per result."""
    choices = []
    for index, result in enumerate(results):
        choice: dict[str, Any] = {"index": index, "finish_reason": FINISH_REASONS[result.finish_reason],
                                  "logprobs": _logprobs_of(job, result, text_of)}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        if result.stop_sequence:
            choice["stop_reason"] = result.stop_sequence   # vLLM's field: which stop string ended it
        choices.append(choice)
    spent = usage(job, [r.prompt_tokens for r in results], sum(len(r.token_ids) for r in results))
    return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": created, "model": job.model, "choices": choices, "usage": spent}


class ChunkWriter:
    """A streamed answer, event by event: engine outputs in, OpenAI chunks out (as SSE bytes)."""

    def __init__(self, job: Job, created: int, text_of: TextOf) -> None:
        self.job = job
        self.text_of = text_of
        self.object = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self.created = created
        self._offsets = [0] * len(job.requests)
        self._prompt_tokens = [0] * len(job.requests)
        self._generated = 0

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk: dict[str, Any] = {"id": self.job.id, "object": self.object, "created": self.created,
                                 "model": self.job.model, "choices": choices}
        if self.job.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def start(self) -> list[bytes]:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if self.job.kind != "chat":
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.job.requests))]

    def _choice(self, index: int, text: str | None, logprobs: dict[str, Any] | None,
                finish: str | None) -> dict[str, Any]:
        if self.job.kind == "chat":
            delta = {"content": text} if text is not None else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        if self.job.top_logprobs is None or not out.token_ids:
            return None
        if self.job.kind == "chat":
            return chat_logprobs(out.token_ids, out.logprobs, out.top_logprobs, self.text_of)
        logprobs, self._offsets[index] = completion_logprobs(out.token_ids, out.logprobs, out.top_logprobs,
                                                             self.text_of, self._offsets[index])
        return logprobs

    def output(self, index: int, out: RequestOutput) -> list[bytes]:
        """The chunks for one engine output of choice `index`: its text (if any), then its end (if it ended)."""
        events = []
        self._generated += len(out.token_ids)
        logprobs = self._logprobs(index, out)
        if out.text or logprobs is not None:
            events.append(self._chunk([self._choice(index, out.text, logprobs, None)]))
        if out.finished and out.finish_reason is not None:
            if out.result is not None:
                self._prompt_tokens[index] = out.result.prompt_tokens
            reason = FINISH_REASONS[out.finish_reason]
            events.append(self._chunk([self._choice(index, None, None, reason)]))
        return events

    def end(self) -> list[bytes]:
        """The usage chunk when asked for, then [DONE]."""
        if not self.job.include_usage:
            return [DONE]
        chunk = {"id": self.job.id, "object": self.object, "created": self.created, "model": self.job.model,
                 "choices": [], "usage": usage(self.job, self._prompt_tokens, self._generated)}
        return [sse(chunk), DONE]
