"""Prefect flows that chain the DVC stages into learn–consolidate cycles (not built yet)."""
