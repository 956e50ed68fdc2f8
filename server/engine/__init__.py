"""The engine: continuous batching over a paged KV cache, per-request sampling and stopping."""
