"""Multi-rank tests run through the library's launcher: a pool of gloo processes per world size."""

from epmoe.launch import DistError, DistTimeout, run_ranks

__all__ = ["DistError", "DistTimeout", "run_ranks"]
