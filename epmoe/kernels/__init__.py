"""Triton kernels (`@triton.jit` functions only; wrappers and policy live with their callers)."""
