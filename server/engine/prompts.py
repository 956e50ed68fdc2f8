"""Turns a request's prompt (raw text or chat messages) into token ids, and checks its limits."""

from __future__ import annotations

import threading
from typing import Any

from adapters_store.errors import quote
from server.engine.errors import InvalidRequest
from server.engine.request import GenerationRequest

MAX_PROMPT_CHARS = 1_000_000
ROLES = ("system", "user", "assistant", "tool")


class PromptEncoder:
    """Thread-safe front of the tokenizer: encode prompts, decode for the detokenizers."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # The Rust tokenizer is shared by the service thread (encode) and the engine (decode).
        self.lock = threading.Lock()

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self._encode_chat(request.messages)
        if not request.prompt:
            raise InvalidRequest("the prompt is empty: give text or chat messages")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        with self.lock:
            return list(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])

    def _encode_chat(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        if not messages:
            raise InvalidRequest("the chat prompt has no messages")
        if self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template: send the prompt as text")
        for role, content in messages:
            if role not in ROLES:
                raise InvalidRequest(f"unknown chat role {quote(role)}; use one of {', '.join(ROLES)}")
            if len(content) > MAX_PROMPT_CHARS:
                raise InvalidRequest(f"a chat message is longer than {MAX_PROMPT_CHARS} characters")
        chat = [{"role": role, "content": content} for role, content in messages]
        with self.lock:
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            # The template already holds any special tokens the model wants.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, **kwargs)
