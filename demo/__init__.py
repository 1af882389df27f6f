"""The embedded default: a synthetic multi-task suite and a small MoE trained on it."""
