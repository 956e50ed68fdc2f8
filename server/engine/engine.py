"""The engine: a background thread that steps the scheduler, runs the model and streams outputs."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from adapters_store.errors import quote
from server.engine.admission import AdmissionGate, EngineStats, RequestHandle
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from server.engine.errors import InvalidRequest, Overloaded, ShuttingDown, UnknownAdapter, UntrustedOutput
from server.engine.observer import EngineObserver
from server.engine.prompts import PromptEncoder
from server.engine.request import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    OutputSink,
    RequestOutput,
    Sequence,
    StoppingParams,
)
from server.engine.runner import ModelRunner
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Scheduler
from server.engine.threads import claim_compute_threads

log = logging.getLogger("deltaserve.engine")

T = TypeVar("T")
MAX_ADAPTER_NAME = 128   # the Adapters API's limit; a longer id cannot name a served adapter


class AdapterResolver(Protocol):
    """Holds a request's adapter for its life: `reserve` at submission returns a lease (the scheduler binds it
    to a version and device slot at admission), `release` when the request ends."""

    def reserve(self, adapter_id: str) -> Any: ...
    def release(self, lease: Any) -> None: ...
    def mark_untrusted(self, lease: Any) -> None: ...


class NoAdapters:
    """The resolver when no adapter store is configured: only the base model exists."""

    def reserve(self, adapter_id: str) -> Any:
        raise UnknownAdapter(f"adapter {quote(adapter_id)} is not registered (no adapters are loaded)")

    def release(self, lease: Any) -> None:
        pass

    def mark_untrusted(self, lease: Any) -> None:
        pass


@dataclass
class EngineLimits:
    """Request limits the engine enforces at submission."""

    max_model_len: int
    default_max_new_tokens: int
    max_waiting: int = 1024      # requests submitted and not yet running, at most; beyond: Overloaded


class Engine:
    """Continuous batching: requests join and leave the running batch at every step.

    `submit` (and the handle's `cancel`) are thread-safe and only enqueue; the engine thread owns the
    scheduler, the KV cache and every sequence, and publishes an `EngineStats` snapshot for other threads.
    """

    def __init__(self, runner: ModelRunner, encoder: PromptEncoder, blocks: BlockManager,
                 scheduler: Scheduler, limits: EngineLimits, eos_token_ids: frozenset[int],
                 adapters: AdapterResolver | None = None, observer: EngineObserver | None = None,
                 threads: int = 0) -> None:
        self.runner = runner
        self.encoder = encoder
        self.blocks = blocks
        self.scheduler = scheduler
        self.limits = limits
        self.eos_token_ids = eos_token_ids
        self.adapters = adapters or NoAdapters()
        self.observer = observer or EngineObserver()
        self.threads = threads            # intra-op threads the engine thread claims (0: all cores)
        self._inbox: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Event()
        self._accepting = True
        self._gate = AdmissionGate(limits.max_waiting)
        self._gated: set[int] = set()     # id() of sequences holding a place in the gate (engine thread only)
        self._stop = False
        self._steps = 0
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="deltaserve-engine", daemon=True)
        self.on_step: Callable[[list[Sequence]], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def set_observer(self, observer: EngineObserver) -> None:
        """Replaces the observer between two steps (so it sees every later request whole)."""
        def swap() -> None:
            self.observer = observer
        self._post(swap)

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: OutputSink) -> RequestHandle:
        """Validates and enqueues a request; raises InvalidRequest, UnknownAdapter, Overloaded, ShuttingDown.
        The handle cancels this request and no other."""
        try:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            seq = self._make_sequence(request, sink)
            try:
                self._gate.enter()
            except Overloaded:
                self._release_adapter(seq)
                raise
        except (InvalidRequest, UnknownAdapter, Overloaded, ShuttingDown) as error:
            self.observer.on_reject(request, error)
            raise
        self._post(lambda: self._enqueue(seq))
        return RequestHandle(request.request_id, lambda: self._post(lambda: self._abort(seq)))

    def stop_accepting(self) -> None:
        """From now on `submit` refuses with ShuttingDown; requests already submitted go on."""
        self._accepting = False

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the engine thread between two steps and returns its result. Benchmarks run their
        reference decoders there: the engine thread is the one that owns the compute threads."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 — handed to the caller
                future.set_exception(error)

        self._post(run)
        return future.result()

    def cancel(self, handle: RequestHandle) -> None:
        """Cancels the request `submit` returned `handle` for (the same as `handle.cancel()`)."""
        if not isinstance(handle, RequestHandle):
            raise TypeError(f"cancel takes the RequestHandle that submit returned, not {type(handle).__name__}")
        handle.cancel()

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published last (never its live queues)."""
        return self._stats

    def shutdown(self, grace: float) -> None:
        """Refuses new requests, lets in-flight ones finish for `grace` seconds, cancels the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        while self._gate.count or self._stats.running or self._stats.waiting or self._inbox:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._post(self._abort_all)
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- submission ---------------------------------------------------------------------------

    def _make_sequence(self, request: GenerationRequest, sink: OutputSink) -> Sequence:
        if len(request.adapter_id) > MAX_ADAPTER_NAME:
            raise InvalidRequest(f"adapter_id {quote(request.adapter_id)} is longer than any adapter name "
                                 f"({MAX_ADAPTER_NAME} characters)")
        request.sampling.validate()
        prompt_ids = self.encoder.encode(request)
        max_len = self.limits.max_model_len
        if len(prompt_ids) >= max_len:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; the context holds {max_len} "
                                 f"(prompt + at least one new token)")
        room = max_len - len(prompt_ids)
        max_new = request.max_new_tokens or min(self.limits.default_max_new_tokens, room)
        if max_new > room:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds "
                                 f"the context length {max_len}")
        stopping = StoppingParams(max_new, request.stop_sequences, request.ignore_eos)
        stopping.validate()
        if request.top_logprobs < 0:
            raise InvalidRequest(f"top_logprobs must not be negative, got {request.top_logprobs}")
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        lease = self.adapters.reserve(request.adapter_id) if request.adapter_id else None
        seq = Sequence(
            request_id=request.request_id, prompt_ids=prompt_ids, sampling=request.sampling,
            stopping=stopping, seed=seed, adapter_id=request.adapter_id,
            return_logprobs=request.return_logprobs, sink=sink, arrival=time.monotonic(), adapter_lease=lease,
            top_logprobs=request.top_logprobs)
        if not request.sampling.greedy:
            seq.generator = make_generator(seed)
        seq.detokenizer = IncrementalDetokenizer(self.encoder, prompt_ids)
        seq.stop_checker = StopChecker(stopping.stop_sequences)
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        self._gated.add(id(seq))
        self.scheduler.add(seq)
        self.observer.on_submit(seq)

    def _ungate(self, seq: Sequence) -> None:
        """Gives back the sequence's admission place: it left the waiting queue for the batch, or ended."""
        if id(seq) in self._gated:
            self._gated.discard(id(seq))
            self._gate.leave()

    def _snapshot(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        return EngineStats(len(s.running), len(s.waiting), b.num_blocks, b.num_free, b.block_size, b.usage,
                           s.max_batch_size, self._gate.limit, self._steps, b.queried_tokens, b.hit_tokens)

    def _post(self, command: Callable[[], None]) -> None:
        self._inbox.append(command)
        self._wakeup.set()

    # ---- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        self.threads = claim_compute_threads(self.threads)
        while True:
            while self._inbox:
                self._inbox.popleft()()
            self._stats = self._snapshot()
            if self._stop:
                return
            if not self.scheduler.has_work:
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a failed step must not kill the engine: fail its requests instead
                log.exception("engine step failed; cancelling the running requests")
                self.observer.on_step_failed(error)
                self._abort_all()
            self._steps += 1
            self._stats = self._snapshot()

    def step(self) -> None:
        step = self.scheduler.schedule()
        for seq in step.prefills:
            self._ungate(seq)
        for seq, error in step.failed:
            self._finish(seq, FinishReason.CANCELLED, RequestOutput(seq.request_id, [], "", [], error=error))
        self.observer.on_schedule(step)
        if step.empty:
            time.sleep(0.001)
            return
        seqs, logits = self.runner.run(step)   # only the sequences that sample: not a prompt read in part
        for seq in step.sequences:
            self.blocks.register(seq)          # full blocks of computed tokens, for later requests to reuse
        finite = torch.isfinite(logits).all(dim=-1)   # [num_seqs]
        if not bool(finite.all()):
            seqs, logits = self._fail_untrusted(seqs, logits, finite)
        if seqs:
            tokens, logprobs = sample(logits, seqs)
            for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
                self._advance(seq, token, logprob)
        self.observer.on_step(seqs)
        if self.on_step is not None:
            self.on_step(seqs)

    def _fail_untrusted(self, seqs: list[Sequence], logits: torch.Tensor,
                        finite: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Fails each row whose logits hold NaN/Inf (never sampled from: garbage is no answer); the other rows
        go on unchanged. Returns the rows left and their logits."""
        keep = finite.tolist()
        for seq, ok in zip(seqs, keep, strict=True):
            if ok:
                continue
            source = f"adapter {seq.adapter_id!r} version {seq.adapter_version}" if seq.adapter_id else "the base model"
            log.error("non-finite logits for request %.64s (%s); failing it", seq.request_id, source)
            if seq.adapter_lease is not None:
                self.adapters.mark_untrusted(seq.adapter_lease)
            self.observer.on_untrusted(seq)
            error = UntrustedOutput(f"the model produced non-finite logits for this request ({source}); the result "
                                    "cannot be trusted and was not returned")
            self._finish(seq, FinishReason.CANCELLED, RequestOutput(seq.request_id, [], "", [], error=error))
        return [s for s, ok in zip(seqs, keep, strict=True) if ok], logits[finite]

    def _advance(self, seq: Sequence, token: int, logprob: float | None) -> None:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.observer.on_token(seq)
        text = seq.stop_checker.add(seq.detokenizer.add(token))
        reason = self._finish_reason(seq, token)
        if reason is not None and reason is not FinishReason.STOP_SEQUENCE:
            text += seq.stop_checker.add(seq.detokenizer.flush()) + seq.stop_checker.finish()
        out = RequestOutput(seq.request_id, [token], text, [logprob] if logprob is not None else [],
                            top_logprobs=seq.top_alternatives[-1:])
        if reason is not None:
            self._finish(seq, reason, out)
        else:
            self._emit(seq, out)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if seq.stop_checker.matched:
            return FinishReason.STOP_SEQUENCE
        if token in self.eos_token_ids and not seq.stopping.ignore_eos:
            return FinishReason.EOS
        if len(seq.output_ids) >= seq.stopping.max_new_tokens or len(seq) >= self.limits.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, out: RequestOutput) -> None:
        self.scheduler.finish(seq)
        self._ungate(seq)
        seq.finished = True
        self._release_adapter(seq)
        self.observer.on_finish(seq, reason)
        out.finished, out.finish_reason = True, reason
        out.result = GenerationResult(
            request_id=seq.request_id, text=seq.stop_checker.text, token_ids=list(seq.output_ids),
            finish_reason=reason, prompt_tokens=len(seq.prompt_ids), seed=seq.seed,
            logprobs=list(seq.logprobs), stop_sequence=seq.stop_checker.matched, adapter_id=seq.adapter_id,
            adapter_version=seq.adapter_version, top_logprobs=list(seq.top_alternatives))
        self._emit(seq, out)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_lease is not None:
            lease, seq.adapter_lease = seq.adapter_lease, None
            self.adapters.release(lease)

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        try:
            seq.sink(out)
        except Exception:
            log.exception("output sink of %s failed", seq.request_id)

    def _abort(self, seq: Sequence) -> None:
        if not seq.finished and self.scheduler.abort(seq):
            self._finish(seq, FinishReason.CANCELLED, RequestOutput(seq.request_id, [], "", []))

    def _abort_all(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._abort(seq)
