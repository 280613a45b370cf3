"""Expert weights and the runner interface.

Weight layout (one MoE layer, this rank's experts, by local index):
    w13: [E_local, 2I, H]  gate rows [0, I) then up rows [I, 2I)  (HF gate_proj; up_proj)
    w2:  [E_local, H, I]   down projection                         (HF down_proj)
    b13: [E_local, 2I] fp32 or None, b2: [E_local, H] fp32 or None  (GPT-OSS biases)
A weight is a plain Tensor (bf16/fp16/fp32) or a quantized tensor (epmoe.quant) with `.dequantize(dtype)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.registry import Registry

# The unquantized weight formats, each named after its dtype. Runners' `formats`, the selection table
# (select.WEIGHT_FORMATS) and the tuned tables treat them alike, as the family keyed "bf16" (weight_family);
# what a user sees names the real dtype.
FLOAT_FORMATS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_WEIGHT_DTYPES = tuple(FLOAT_FORMATS.values())
UNQUANTIZED = "bf16"  # the key of the unquantized family in runners' formats and tuned tables


def float_format(dtype: torch.dtype) -> str:
    """The format name of unquantized weights of `dtype` ("bf16", "fp16", "fp32"); other dtypes
    (refused by ExpertWeights.check) by their torch name, e.g. "int8"."""
    return next((k for k, v in FLOAT_FORMATS.items() if v == dtype), str(dtype).removeprefix("torch."))


def weight_family(fmt: str) -> str:
    """"bf16" for every unquantized format ("bf16", "fp16", "fp32"), else `fmt` ("fp8", ...)."""
    return UNQUANTIZED if fmt in FLOAT_FORMATS else fmt


def as_float(t: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A plain tensor in `dtype`: dequantizes quantized tensors, casts plain ones."""
    return t.to(dtype) if isinstance(t, torch.Tensor) else t.dequantize(dtype)


@dataclass
class ExpertWeights:
    """This rank's expert weights; see the module docstring for the layout."""

    w13: Any
    w2: Any
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def format(self) -> str:
        """The dtype of plain tensors ("bf16", "fp16", "fp32"), else the quantized format ("fp8",
        "fp8_block", "nvfp4"); weight_family(format) is what runners and the selection table match."""
        return float_format(self.w13.dtype) if isinstance(self.w13, torch.Tensor) else self.w13.format

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def check(self, cfg: MoEConfig, num_local: int) -> None:
        """Raise ValueError unless the shapes match `cfg` with `num_local` experts."""
        E, H, I = num_local, cfg.hidden, cfg.intermediate
        expect = {"w13": (E, 2 * I, H), "w2": (E, H, I)}
        if cfg.has_bias:
            expect.update(b13=(E, 2 * I), b2=(E, H))
        for name, shape in expect.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"expert weight {name} is missing; {cfg.activation} experts need it")
            if isinstance(t, torch.Tensor) and name in ("w13", "w2") and t.dtype == torch.float64:
                raise ValueError(f"expert weight {name} is float64, which the runners do not support; convert it "
                                 f"with {name}.float() (or .bfloat16())")
            if isinstance(t, torch.Tensor) and name in ("w13", "w2") and t.dtype not in FLOAT_WEIGHT_DTYPES:
                raise ValueError(f"expert weight {name} is {t.dtype}; unquantized weights must be bf16, fp16 or fp32 "
                                 "(quantized weights: an epmoe.quant QuantizedTensor, e.g. quantize_weights(w, 'fp8'))")
            if tuple(t.shape) != shape:
                raise ValueError(f"expert weight {name} has shape {tuple(t.shape)}, expected {shape} "
                                 f"(E_local={E}, H={H}, I={I})")

    @classmethod
    def random(cls, cfg: MoEConfig, num_local: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               scale: float = 1.0) -> ExpertWeights:
        """Random weights with unit-variance outputs (for tests, demos and benchmarks)."""
        E, H, I = num_local, cfg.hidden, cfg.intermediate

        def rnd(*shape: int, fan_in: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator) * (scale / fan_in**0.5)).to(device=device, dtype=dtype)

        w13, w2 = rnd(E, 2 * I, H, fan_in=H), rnd(E, H, I, fan_in=I)
        if not cfg.has_bias:
            return cls(w13, w2)
        return cls(w13, w2, rnd(E, 2 * I, fan_in=4).float(), rnd(E, H, fan_in=4).float())

    def select(self, local: torch.Tensor) -> ExpertWeights:
        """The experts at local indices `local` (e.g. one rank's share of a full set)."""
        pick = (lambda t: None if t is None else t[local])  # noqa: E731
        return ExpertWeights(self.w13[local], self.w2[local], pick(self.b13), pick(self.b2))


class ExpertRunner:
    """Computes expert MLPs for the pairs of a `Dispatched`: `runner(d)` -> out [M, H] in the activation
    dtype, one row per pair (padding pairs: undefined rows), no router weights. Built once per layer.

    Every runner declares (the registry refuses one that leaves any to this class): `formats` (weight
    formats; "bf16" = the unquantized family, see weight_family), `devices` ("cpu" / "cuda"),
    `needs_host_sync` (a call reads device values on the host), `priority` (higher = faster; select.py
    picks the highest that fits), `Options` (frozen dataclass, all fields with defaults), and
    `prepare(weights, cfg)`, the one-time transform into its kernels' layout (checkpoint.py calls it).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    devices: ClassVar[tuple[str, ...]]
    needs_host_sync: ClassVar[bool]
    priority: ClassVar[int]
    Options: ClassVar[type]

    def __init__(self, cfg: MoEConfig, weights: ExpertWeights, options: Any = None) -> None:
        """options None = `Options()`."""
        self.cfg, self.weights = cfg, weights
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"runner {self.name!r} takes {self.Options.__name__} options, "
                            f"got {type(self.options).__name__}")

    @classmethod
    def prepare(cls, weights: ExpertWeights, cfg: MoEConfig) -> ExpertWeights:
        """The weights in the layout this runner reads (one-time, at load)."""
        raise NotImplementedError

    def __call__(self, d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


RUNNERS: Registry[type[ExpertRunner]] = Registry(
    "expert runner", required=("formats", "devices", "needs_host_sync", "priority"))
register_runner = RUNNERS.register
get_runner = RUNNERS.get
