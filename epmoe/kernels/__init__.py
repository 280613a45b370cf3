"""Triton and Gluon kernels only; wrappers and policy live with their callers (notes: docs/kernels.md)."""
