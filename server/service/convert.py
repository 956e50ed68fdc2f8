"""Protobuf <-> domain objects for the Generation service."""

from __future__ import annotations

import uuid

from deltaserve.v1 import generation_pb2 as pb
from server.engine.errors import InvalidRequest
from server.engine.request import FinishReason, GenerationRequest, GenerationResult, SamplingParams

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
MAX_REQUEST_ID = 128


def request_from_proto(msg: pb.GenerateRequest) -> GenerationRequest:
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("the request has no prompt: set `text` or `chat`")
    if len(msg.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID} characters")
    s = msg.sampling
    # 0 is proto3's "unset": the neutral value of each knob.
    sampling = SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.top_p != 0 else 1.0,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty if s.repetition_penalty != 0 else 1.0,
        seed=s.seed if s.HasField("seed") else None,
    )
    messages = tuple((m.role, m.content) for m in msg.chat.messages) if kind == "chat" else None
    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=msg.text if kind == "text" else None,
        messages=messages,
        adapter_id=msg.adapter_id,
        sampling=sampling,
        max_new_tokens=msg.stopping.max_new_tokens,
        stop_sequences=tuple(msg.stopping.stop_sequences),
        ignore_eos=msg.stopping.ignore_eos,
        return_logprobs=msg.return_logprobs,
    )


def result_to_proto(result: GenerationResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=result.request_id,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=FINISH_REASONS[result.finish_reason],
        prompt_tokens=result.prompt_tokens,
        generated_tokens=len(result.token_ids),
        seed=result.seed,
        logprobs=result.logprobs,
        stop_sequence=result.stop_sequence,
        adapter_id=result.adapter_id,
        adapter_version=result.adapter_version,
    )
