"""What the engine tells an observer (metrics, tracing) about requests and steps; a no-op by default."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.request import FinishReason, GenerationRequest, Sequence
    from server.engine.scheduler import ScheduledStep


class EngineObserver:
    """Hooks the engine calls at a handful of points; every one does nothing here.

    All hooks but `on_reject` run on the engine thread, in this order for one request:
    `on_submit`, `on_schedule` (every step that admits or preempts it), `on_token` (once per
    generated token), `on_finish` (exactly once). They must be quick (O(1) per token, no long
    locks) and must not raise: the engine thread does not guard against them.
    """

    def on_reject(self, request: GenerationRequest, error: Exception) -> None:
        """A request refused at submission (bad request, unknown adapter, full queue, shutting down).

        Runs on the submitting thread.
        """

    def on_submit(self, seq: Sequence) -> None:
        """A request entered the waiting queue."""

    def on_schedule(self, step: ScheduledStep) -> None:
        """The scheduler chose a step: prompts to prefill, sequences to decode, sequences preempted."""

    def on_token(self, seq: Sequence) -> None:
        """`seq` has just received a token (already in `seq.output_ids`)."""

    def on_finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq` ended: finished, stopped or cancelled; its resources are already freed."""

    def on_step(self, seqs: list[Sequence]) -> None:
        """A step ran: each of `seqs` received one token."""

    def on_untrusted(self, seq: Sequence) -> None:
        """A request failed because its logits were not finite."""

    def on_step_failed(self, error: Exception) -> None:
        """A step raised; every running and waiting request is about to be cancelled."""
