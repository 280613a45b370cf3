"""Compile a Gluon kernel for a GPU target without a GPU (tests and probes read its PTX).
Not under TRITON_INTERPRET=1: the kernel modules must be imported in a process without it."""

from __future__ import annotations

import os
from typing import Any


def compile_gluon(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                  arch: int = 90, divisible: tuple[str, ...] = ()) -> Any:
    """Build `fn` for sm_<arch>; `signature` maps every argument to its Triton type ("*bf16",
    "i32", ...) or "constexpr" (given in `constexprs`); `divisible` names the arguments to
    assume multiples of 16 (pointers: 16-byte aligned), as a launch specializes them. Returns the
    compiled kernel (.asm["ptx"], .asm["cubin"])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_gluon needs a process without TRITON_INTERPRET (its standard library "
                           "functions are interpreted there); run it in a subprocess")
    sig = {name: signature[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in divisible}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
