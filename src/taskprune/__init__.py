"""taskprune: task-specific structured pruning of LLM MLP neurons."""

__version__ = "0.1.0"
