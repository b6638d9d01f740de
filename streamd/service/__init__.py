"""Service: the per-stream pipeline, the engine and daemon, control, events, metrics and readiness."""
