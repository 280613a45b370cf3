"""The one wire format of dispatched token rows: payload names, bytes per row, encode / decode.

payload ("bf16" or None: the activations as they are, any float dtype); the parts of one row:
    bf16        x row                                   H * x.element_size() bytes
    fp8         e4m3 row | its tensor's fp32 scale      H + 4 (one scale per sending rank's batch)
    fp8_block   e4m3 row | fp32 scale per 128 values    H + 4 * ceil(H / 128)   (per-token groups)
    nvfp4       e2m1 pairs | e4m3 scale per 16 | fp32 global scale    H / 2 + H / 16 + 4

The sender quantizes its own rows (scales from its batch, or a static `input_scale` shared by
every rank); per-tensor scales are repeated on every row, so rows of several ranks can sit side by
side, viewed back as a `QuantizedTensor` with per-row scales. `allgather` / `nccl_a2a` move one
byte row per token that also carries its routing (`row_layout`: the parts, then ids int32 [K] and
weights fp32 [K]); `symm_a2a` keeps data, scales and global scale in separate planes
(`encode_bytes` / `decode_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epmoe.config import MoEConfig
from epmoe.quant import FP8_BLOCK, FP8_DTYPE, NVFP4_BLOCK, QuantizedTensor, quantize_activations, quantize_fp8
from epmoe.util import cdiv

PAYLOADS = ("bf16", "fp8", "fp8_block", "nvfp4")
_FILL = 0xFF  # unused wire bytes: NaN floats, -1 ids, so a row nobody wrote is never taken as data


def check_payload(payload: str | None, hidden: int | None = None) -> str:
    """The canonical payload name ("bf16" for None), checked (and, given `hidden`, that rows fit)."""
    name = payload or "bf16"
    if name not in PAYLOADS:
        raise ValueError(f"unknown payload {payload!r}; supported payloads: {', '.join(PAYLOADS)} "
                         "(None or 'bf16' = the activations unquantized)")
    if name == "nvfp4" and hidden is not None and hidden % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 payloads need hidden % {NVFP4_BLOCK} == 0, got hidden={hidden}; use fp8_block")
    return name


def payload_parts(payload: str, hidden: int, dtype: torch.dtype) -> tuple[tuple[torch.dtype, int], ...]:
    """(dtype, columns) of each part of a row (the module docstring's table; bf16 rows keep `dtype`)."""
    H = hidden
    if payload == "bf16":
        return ((dtype, H),)
    if payload == "fp8":
        return ((FP8_DTYPE, H), (torch.float32, 1))
    if payload == "fp8_block":
        return ((FP8_DTYPE, H), (torch.float32, cdiv(H, FP8_BLOCK)))
    return ((torch.uint8, H // 2), (FP8_DTYPE, H // NVFP4_BLOCK), (torch.float32, 1))


def payload_row_bytes(payload: str, hidden: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(data, scales, global scale) bytes per row for `payload` (0 for absent parts)."""
    widths = [n * d.itemsize for d, n in payload_parts(check_payload(payload, hidden), hidden, dtype)]
    return tuple(widths + [0] * (3 - len(widths)))  # type: ignore[return-value]


COMBINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_combine_dtype(combine_dtype: torch.dtype | str) -> torch.dtype:
    """fp32 (default) or bf16 partial sums on the combine wire."""
    if isinstance(combine_dtype, str):
        if combine_dtype not in COMBINE_DTYPES:
            raise ValueError(f"combine_dtype must be one of {sorted(COMBINE_DTYPES)}, got {combine_dtype!r}")
        return COMBINE_DTYPES[combine_dtype]
    if combine_dtype not in COMBINE_DTYPES.values():
        raise ValueError(f"combine_dtype must be torch.float32 or torch.bfloat16, got {combine_dtype}")
    return combine_dtype


def check_options(o: Any) -> None:
    """Canonicalise and check, in a frozen options dataclass of a token-moving backend, the fields
    they all have: max_tokens_per_rank, payload, combine_dtype, input_scale."""
    m = o.max_tokens_per_rank
    if m is not None and (not isinstance(m, int) or m <= 0):
        raise ValueError(f"max_tokens_per_rank must be a positive int, got {m!r}")
    object.__setattr__(o, "payload", check_payload(o.payload))
    object.__setattr__(o, "combine_dtype", check_combine_dtype(o.combine_dtype))
    check_input_scale(o.input_scale, o.payload)


def check_input_scale(input_scale: float | torch.Tensor | None, payload: str) -> torch.Tensor | None:
    """A static activation scale (the checkpoint's per-layer `input_scale`) as an fp32 CPU scalar, or
    None: fp8's per-tensor / nvfp4's global scale, the same on every rank (no other payload takes one)."""
    if input_scale is None:
        return None
    if payload not in ("fp8", "nvfp4"):
        raise ValueError(f"input_scale is the static scale of fp8 / nvfp4 payloads, not of {payload!r} "
                         "(fp8_block scales are per token group; bf16 rows are not quantized)")
    scale = torch.as_tensor(input_scale, dtype=torch.float32).detach().cpu()
    if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or not float(scale) > 0:
        raise ValueError(f"input_scale must be one finite value > 0, got {input_scale!r}")
    return scale.reshape(())


def scale_code(scale: torch.Tensor | None) -> int:
    """The bits of a static scale as an int (0 = none), for the cross-rank agreement checks."""
    return 0 if scale is None else int(scale.reshape(1).view(torch.int32)[0])


def scale_text(code: int) -> str:
    """A `scale_code` as a person reads it."""
    return "none" if code == 0 else f"{torch.tensor([code], dtype=torch.int32).view(torch.float32).item():g}"


def encode(x: torch.Tensor, payload: str, scale: torch.Tensor | None = None, backend: str = "auto"
           ) -> list[torch.Tensor]:
    """x [T, H] -> the parts of its rows ([T, n_i] each, dtypes of `payload_parts`), quantized here.
    scale: static scale on x's device, or None (this batch's). backend: the quantizers' ("torch",
    "triton"); "auto": Triton on CUDA where it takes the shape (fp8_block: whole 128-groups)."""
    if payload == "bf16":
        return [x]
    T, H = x.shape
    if backend == "auto":
        backend = "triton" if x.is_cuda and (payload != "fp8_block" or H % FP8_BLOCK == 0) else "torch"
    if payload == "fp8":  # one scale for this rank's batch, repeated per row for the receivers
        q = quantize_fp8(x, scale)
        return [q.data, q.scales.reshape(1, 1).expand(T, 1)]
    q = quantize_activations(x, payload, scale=scale, backend=backend)
    if payload == "fp8_block":
        return [q.data, q.scales]
    return [q.data, q.scales, q.global_scale.reshape(1, 1).expand(T, 1)]


def decode(parts: Sequence[torch.Tensor], payload: str, hidden: int) -> Any:
    """Received payload parts -> rows [N, H]: a Tensor, or a QuantizedTensor with per-row scales."""
    if payload == "bf16":
        return parts[0]
    if payload == "fp8":
        return QuantizedTensor(parts[0], parts[1], (1, hidden), "fp8")
    if payload == "fp8_block":
        return QuantizedTensor(parts[0], parts[1], (1, FP8_BLOCK), "fp8_block")
    return QuantizedTensor(parts[0], parts[1], (1, NVFP4_BLOCK), "nvfp4", parts[2])


def encode_bytes(x: torch.Tensor, payload: str, scale: torch.Tensor | None = None, backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> (data uint8 [T, D], scales uint8 [T, S], gscale fp32 [T, G/4]): `encode`'s parts
    as byte planes (absent parts: 0 columns; per-tensor scales copied onto every row)."""
    T, planes, parts = x.shape[0], [], encode(x, payload, scale, backend)
    for i, (p, (d, n)) in enumerate(zip(parts, payload_parts(payload, x.shape[1], x.dtype))):
        p = torch.empty((T, n), dtype=d, device=x.device).copy_(p) if i else p  # scales: one copy per row
        planes.append(p.contiguous().view(torch.uint8).view(T, n * d.itemsize))
    empty = [x.new_empty(T, 0, dtype=torch.uint8), x.new_empty(T, 0, dtype=torch.float32)]
    planes = (planes + empty[len(planes) - 1 :])[:3]
    return planes[0], planes[1], planes[2].view(torch.float32)


def decode_bytes(planes: Sequence[torch.Tensor], payload: str, hidden: int, dtype: torch.dtype) -> Any:
    """Byte planes (data uint8 [N, D], scales uint8 [N, S], gscale fp32 [N, G/4]; views of a
    receive buffer) -> `decode`'s hidden rows, viewing each plane in its part's dtype (no copy)."""
    parts = [p if p.dtype == d else p.view(d) for p, (d, _) in zip(planes, payload_parts(payload, hidden, dtype))]
    return decode(parts, payload, hidden)


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one wire row: `parts` are (dtype, columns) in order; ids and weights last."""

    parts: tuple[tuple[torch.dtype, int], ...]

    @property
    def widths(self) -> list[int]:
        return [n * d.itemsize for d, n in self.parts]

    @property
    def nbytes(self) -> int:
        """Bytes per row."""
        return sum(self.widths)


def row_layout(cfg: MoEConfig, payload: str, x_dtype: torch.dtype) -> RowLayout:
    """The wire row for `payload` with activations of `x_dtype`: the payload parts, then the
    token's routing ids int32 [K] and weights fp32 [K]."""
    meta = ((torch.int32, cfg.top_k), (torch.float32, cfg.top_k))
    return RowLayout(payload_parts(payload, cfg.hidden, x_dtype) + meta)


def pack_rows(parts: Sequence[torch.Tensor], layout: RowLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row parts ([T, n_i] each, dtypes of `layout`) -> uint8 [T, layout.nbytes]."""
    T = parts[0].shape[0]
    if out is None:
        out = torch.empty(T, layout.nbytes, dtype=torch.uint8, device=parts[0].device)
    col = 0
    for p, width in zip(parts, layout.widths):
        out[:, col : col + width] = p.contiguous().view(torch.uint8).reshape(T, width)
        col += width
    return out


def unpack_rows(buf: torch.Tensor, layout: RowLayout) -> list[torch.Tensor]:
    """uint8 [N, layout.nbytes] -> the parts, each [N, n_i] in its dtype: the payload a strided view
    of `buf` where the row stride allows it, the small ones copies."""
    out, col = [], 0
    for i, ((dtype, n), width) in enumerate(zip(layout.parts, layout.widths)):
        cols = buf[:, col : col + width]
        elt = width // n
        if i == 0 and buf.stride(0) % elt == 0:
            out.append(cols.view(dtype))  # [N, n], row stride nbytes / elt
        else:
            # a fresh copy with standard strides: .contiguous() returns 0 or 1 rows as they are,
            # with a byte offset and row stride that a wider dtype cannot view
            out.append(cols.clone(memory_format=torch.contiguous_format).view(dtype).reshape(buf.shape[0], n))
        col += width
    return out


def empty_rows(n: int, layout: RowLayout, device: torch.device, filled: int = 0) -> torch.Tensor:
    """uint8 [n, nbytes]; rows past `filled` (that the caller will not write) hold 0xFF: NaN, -1 ids."""
    buf = torch.empty((n, layout.nbytes), dtype=torch.uint8, device=device)
    if filled < n:
        buf[filled:].fill_(_FILL)
    return buf
