"""Launch wrappers of the kernels, each beside its plain-PyTorch twin (same arguments).

One module per kernel family; functions take tensors and plain arguments (never backend or
runner objects), validate them, allocate outputs the caller did not pass, and launch the
kernels of `epmoe/kernels/` (which hold `@triton.jit` / Gluon code only). Policy modules
(comm backends, runners, routing, quant) call these.
"""
