"""The local model registry (filled by the registry issue)."""
