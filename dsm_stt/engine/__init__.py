"""Synchronous batched streaming: per-slot state, the batched step, the scheduler, and words."""
