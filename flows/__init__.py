"""Prefect flows composing the tasks into the release pipeline (filled by the flows issue)."""
