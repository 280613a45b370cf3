"""Launch a compiled Triton kernel again with less host work than `kernel[grid](...)`.

Per call, `JITFunction.run` binds and specializes every argument, builds a cache key and looks
the kernel up; its launcher then calls each tensor's `data_ptr()` and asks the driver about the
address (cuPointerGetAttribute). An eager MoE layer makes four or five launches per call, and
this path costs several times the launch itself. `launcher(kernel)[grid](*args, **kwargs)` takes
the same arguments as `kernel[grid](...)` and keeps the compiled kernel per key of what Triton
specializes on, computed here:

    tensor        -> (dtype, device index, address % 16 == 0); the launcher gets the address (an int)
    int           -> (== 1, % 16 == 0, width: 32 bit / 64 bit / unsigned 64 bit)
    constexpr     -> its value (positional or keyword)
    float, None   -> their type;  bool -> its value
    anything else -> its identity (a descriptor kept by the caller: the entry keeps it alive)
    kwargs        -> their values (constexprs and options: num_warps, num_stages, launch_pdl)

The key is at least as fine as Triton's (never two specializations under one key). The first call
of a key goes through `kernel[grid](...)`, which compiles and checks, and keeps the compiled
kernel it returns; later calls hand the arguments, in parameter order, straight to that kernel's
launcher, with no launch hooks (Triton >= 3.6 holds them in a `HookChain` that its own path calls
around every launch, empty or not). Plain `kernel[grid](...)` runs instead under TRITON_INTERPRET=1,
while a launch hook is set (profilers such as proton), and unless the environment sets
EPMOE_FAST_LAUNCH=1 (read once at import; off by default until measured on a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

# opt-in until its GPU tests and `bench layer --host` have run with it (scripts/gpu_host.sh host)
ENABLED = os.environ.get("EPMOE_FAST_LAUNCH", "0").strip().lower() in ("1", "true", "yes", "on")
_MAX_ENTRIES = 512  # per kernel; past it the table starts afresh (a caller making new descriptors per call)


def _split(args: tuple[Any, ...], constexprs: frozenset[int]) -> tuple[tuple[Any, ...], list[Any]] | None:
    """(the arguments' part of the specialization key, the arguments as the launcher takes them:
    tensors as addresses); None for an argument of a type the key does not cover. constexprs:
    the positions of constexpr parameters (keyed by value)."""
    key: list[Any] = []
    out: list[Any] = []
    push, put, tensor = key.append, out.append, torch.Tensor
    for i, a in enumerate(args):
        t = type(a)
        if t is int and i not in constexprs:
            # 1, multiples of 16, others; wider than 32 bits: codes of their own
            push((1 if a == 1 else 2 if a & 15 == 0 else 3) if -2147483648 <= a < 2147483648 else
                 (4 if a & 15 == 0 else 5) if -(2**63) <= a < 2**63 else 6 + (a & 15 == 0))
            put(a)
        elif isinstance(a, tensor):
            ptr = a.data_ptr()
            push(a.dtype)
            push(a.get_device() if ptr & 15 == 0 else -100 - a.get_device())  # device and 16-byte alignment
            put(ptr)
        elif i in constexprs:
            push((None, a))
            put(a)
        elif t is bool:
            push(a)
            put(a)
        elif t is float or a is None:
            push(t)
            put(a)
        elif t.__name__ == "TensorDescriptor":  # kept by its caller (weights): named by identity
            push((t, id(a)))
            put(a)
        else:
            return None
    return tuple(key), out


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: a callable, or a non-empty `HookChain` (Triton >= 3.6)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Entry:
    """A compiled kernel's launch handles, and the descriptors its key names by identity."""

    __slots__ = ("run", "function", "metadata", "tail", "keep")

    def __init__(self, compiled: Any, tail: list[Any], keep: list[Any]) -> None:
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.tail = tail  # the parameters after the positional arguments: kwargs or defaults (in the key)
        self.keep = keep


class Launcher:
    """`kernel[grid](...)` with the per-call work done once per specialization (module docstring)."""

    def __init__(self, kernel: Any, fast: bool | None = None) -> None:
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        # interpreted kernels (TRITON_INTERPRET=1 at import) and anything else: plain launches
        self.fast = (ENABLED if fast is None else fast) and isinstance(kernel, JITFunction)
        self.names: list[str] = list(getattr(kernel, "arg_names", ()))
        params = getattr(kernel, "params", ())
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.constexprs = frozenset(i for i, p in enumerate(params) if p.is_constexpr)
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self._driver: Any = None
        self._knobs: Any = None

    def __getitem__(self, grid: Sequence[int]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: Sequence[int], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """One launch of the kernel over `grid` (up to three ints)."""
        if not self.fast:
            self.kernel[grid](*args, **kwargs)
            return
        if self._driver is None:
            from triton import knobs
            from triton.runtime.driver import driver

            self._driver, self._knobs = driver.active, knobs.runtime
        if _hooked(self._knobs.launch_enter_hook) or _hooked(self._knobs.launch_exit_hook):
            self.kernel[grid](*args, **kwargs)  # a profiler watches launches: Triton's own path
            return
        split = _split(args, self.constexprs)
        if split is None:
            self.kernel[grid](*args, **kwargs)
            return
        device = self._driver.get_current_device()
        key = (device, split[0], tuple(kwargs.items()))
        entry = self.entries.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if len(self.entries) >= _MAX_ENTRIES:
                self.entries.clear()
            if hasattr(compiled, "packed_metadata"):
                tail = [kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):]]
                keep = [a for a in args if type(a).__name__ == "TensorDescriptor"]
                self.entries[key] = _Entry(compiled, tail, keep)
            return
        full = split[1]
        full += entry.tail
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        entry.run(grid[0], g1, g2, self._driver.get_current_stream(device), entry.function, entry.metadata,
                  None, None, None, *full)


_LAUNCHERS: dict[int, Launcher] = {}


def launcher(kernel: Any) -> Launcher:
    """The one `Launcher` of `kernel` (a `@triton.jit` function)."""
    found = _LAUNCHERS.get(id(kernel))
    if found is None or found.kernel is not kernel:
        found = _LAUNCHERS[id(kernel)] = Launcher(kernel)
    return found
