"""Turns a request's prompt (raw text or chat messages) into token ids, and checks its limits."""

from __future__ import annotations

import copy
import threading
from typing import Any

from adapters_store.errors import quote
from server.engine.errors import InvalidRequest
from server.engine.request import GenerationRequest

MAX_PROMPT_CHARS = 1_000_000
ROLES = ("system", "user", "assistant", "tool")


class PromptEncoder:
    """Thread-safe front of the tokenizer: encode prompts, decode for the detokenizers.

    Encoding (service threads, a long prompt may take a while) and decoding (the engine thread's detokenizers,
    every step) use two copies of the tokenizer under two locks, so a prompt being read never stalls a step.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A Rust tokenizer is not safe to use from two threads at once: one lock per copy.
        self.encode_lock = threading.Lock()
        self._decoder = copy.deepcopy(tokenizer)
        self._decode_lock = threading.Lock()

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self._encode_chat(request.messages)
        if not request.prompt:
            raise InvalidRequest("the prompt is empty: give text or chat messages")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        with self.encode_lock:
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
        with self.encode_lock:
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            # The template already holds any special tokens the model wants.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        with self._decode_lock:
            return self._decoder.decode(ids, **kwargs)
