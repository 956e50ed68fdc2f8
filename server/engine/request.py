"""Requests as the engine sees them: parameters, state of a running sequence, and its outputs."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.binding import NO_ADAPTER, AdapterBinding
from server.engine.errors import InvalidRequest


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


# The most likely tokens at one position, most likely first: (token id, logprob) from the same log-softmax as
# `logprobs` (before temperature, penalties and filtering).
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must not be negative, got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StoppingParams:
    """When to stop: a token budget, stop strings, end-of-sequence."""

    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if len(self.stop_sequences) > 16:
            raise InvalidRequest(f"at most 16 stop sequences, got {len(self.stop_sequences)}")
        for stop in self.stop_sequences:
            if not stop or len(stop) > 256:
                raise InvalidRequest("stop sequences must be 1 to 256 characters long")


@dataclass
class RequestOutput:
    """What one engine step produced for one request; `finished` is set on its last output."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finished: bool = False
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None
    error: Exception | None = None   # the request ended before its first token because it cannot be served
    top_logprobs: list[TopLogprobs] = field(default_factory=list)   # per token in token_ids, when asked for


@dataclass
class GenerationResult:
    """A finished generation, whole."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int
    logprobs: list[float]
    stop_sequence: str
    adapter_id: str
    adapter_version: int = 0     # the adapter version it ran on (0: none)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)   # per generated token, when asked for


OutputSink = Callable[[RequestOutput], None]
_sequence_counter = itertools.count()


@dataclass
class Sequence:
    """A request inside the engine: its tokens, KV blocks and progress."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    seed: int
    adapter_id: str
    return_logprobs: bool
    sink: OutputSink
    arrival: float
    order: int = field(default_factory=lambda: next(_sequence_counter))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # prefix-cache hash of each leading full block
    num_cached: int = 0          # tokens whose K/V are in the cache
    finished: bool = False
    generator: Any = None        # torch.Generator for sampled requests, seeded with `seed`
    detokenizer: Any = None      # IncrementalDetokenizer
    stop_checker: Any = None     # StopChecker
    adapter_lease: Any = None    # the adapter resolver's hold on its adapter (None: the base model)
    binding: AdapterBinding = NO_ADAPTER   # its adapter's slot, version and shared KV, set at admission
    top_logprobs: int = 0        # alternatives to report per token (0: none)
    top_alternatives: list[TopLogprobs] = field(default_factory=list)   # one per output token, by the sampler

    @property
    def adapter_slot(self) -> int:
        return self.binding.slot

    @property
    def adapter_version(self) -> int:
        return self.binding.version

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_cached == 0


@dataclass(frozen=True)
class GenerationRequest:
    """A request as the service hands it to the engine (already translated from protobuf)."""

    request_id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content), rendered by the chat template
    adapter_id: str = ""
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 0                              # 0: the server default
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    return_logprobs: bool = False
    top_logprobs: int = 0                                # the k most likely tokens per position (0: none)
