"""Prefect tasks: thin wrappers over lorakit library functions, one per release stage (see tasks.stages)."""
