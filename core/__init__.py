"""Layer 0, the base: the config schema, errors, paths and durable I/O. Imports nothing of ours."""
