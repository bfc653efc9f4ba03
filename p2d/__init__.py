"""P2D Studio: find task-sensitive attention heads, select data with them, tune only those heads."""

__version__ = "0.1.0"
