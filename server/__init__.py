"""The HTTP server, the engine that owns the model, and the `taer` command line."""
