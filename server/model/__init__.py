"""The frozen base model: loading, and our own batched forward over a paged KV cache."""
