"""Per-request deltas: one module per parameter-efficient method, behind one interface."""
