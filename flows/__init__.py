"""Prefect flows chaining the DVC stages into learn–consolidate cycles: ``continual_learning`` (the
sequence), ``inbox`` (dropped text files become the next cycle) and ``serve`` (the deployments).
Orchestration only: the work is in the stages and ``hst``."""
