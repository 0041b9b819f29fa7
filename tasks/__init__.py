"""Prefect tasks: thin wrappers over lorakit library functions (filled by the flows issue)."""
