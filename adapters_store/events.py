"""What the store reports about adapter loads to whoever listens (metrics); a no-op by default."""

from __future__ import annotations

from adapters_store.types import AdapterWeights


class StoreListener:
    """Told of every load attempt, on the loading thread; must be quick and must not raise."""

    def on_load(self, weights: AdapterWeights, seconds: float) -> None:
        """An adapter was read and validated in `seconds` (now served)."""

    def on_load_failed(self, name: str, reason: str) -> None:
        """Loading `name` failed; `reason` is the AdapterError reason ("load_failed" for a surprise)."""

# The reason a listener is given when the server, not the store, refuses a loaded adapter (e.g. its
# rank is above --max-lora-rank): not an AdapterError reason, the store accepted the files.
DELTA_REJECTED = "delta_rejected"
