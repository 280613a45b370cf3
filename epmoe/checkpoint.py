"""Load one MoE layer of a safetensors checkpoint: this rank's experts only.

    ckpt = load_moe_layer("path/to/model", cfg, layer=3, rank=r, world=W)
    layer = MoELayer(cfg, ckpt.experts, group, gate=ckpt.gate, gate_bias=ckpt.gate_bias,
                     correction_bias=ckpt.correction_bias, shared=ckpt.shared)

`path` is a directory (with `model.safetensors` or `model.safetensors.index.json`), one
`.safetensors` file, or an index `.json`. Only the tensors (for fused 3-D tensors: the expert
slices) of this rank's experts are read, through `safe_open(...).get_slice`.

Names understood (prefix before `layers.{L}.` free, e.g. `model.` or `model.language_model.`):
    per expert  `layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.*`       Qwen, DeepSeek, OLMoE
                `layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.*`   Mixtral, MiniMax
    fused       `layers.{L}.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows then up rows) and
                `down_proj` [E, H, I]  (transformers v5); GPT-OSS (activation swiglu_clamped):
                `gate_up_proj` [E, H, 2I] with gate/up interleaved along the last dim, `down_proj`
                [E, I, H], `*_bias`: transposed and de-interleaved to our layout at load.
    router      `{moe}.gate.weight` or `{moe}.router.weight` (+ `.bias`); correction bias
                `{moe}.gate.e_score_correction_bias` or `{moe}.e_score_correction_bias`.
    shared      `{moe}.shared_experts.*` (DeepSeek) or `{moe}.shared_expert.*` (Qwen2-MoE without
                its sigmoid `shared_expert_gate`, which is refused).
Weight formats (per-expert names), recognised from dtypes and sibling tensors:
    bf16       float `weight`
    fp8_block  e4m3 `weight` + fp32 `weight_scale_inv` [ceil(N/128), ceil(K/128)] (DeepSeek-V3)
    fp8        e4m3 `weight` + fp32 scalar `weight_scale` (+ `input_scale`)    (ModelOpt FP8)
    nvfp4      uint8 `weight` [N, K/2] + e4m3 `weight_scale` [N, K/16] + fp32 `weight_scale_2`
               + fp32 `input_scale`                                          (ModelOpt NVFP4)
Every scale multiplies (see docs/formats.md). Shared experts are dequantized at load (the
shared MLP runs unquantized). Runner-specific preparation runs once, at the end of loading:
the runner's `prepare` classmethod (`runner="auto"`, the default, is the runner `MoELayer` picks for
the device: triton on CUDA, reference on the CPU).

Activation scales: epmoe quantizes activations with *dynamic* scales by default (computed from
the rows being quantized). A checkpoint's static `input_scale` (fp8 / nvfp4) is not applied to
the experts' GEMMs; it is returned in `MoELayerWeights.input_scales` (per local expert, zeros
replaced) for payload quantization: pass its max as the comm backend's static payload scale so
that every rank quantizes with the same scale.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, get_runner
from epmoe.group import Placement
from epmoe.layer import SharedExperts
from epmoe.quant import FP8_BLOCK, NVFP4_BLOCK, QuantizedTensor
from epmoe.select import pick_runner
from epmoe.util import cdiv

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8,
}
_FLOAT = ("BF16", "F16", "F32")
# projection names per naming scheme: (gate, up, down)
_PROJ = {"hf": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


class CheckpointFiles:
    """Name -> file map of a safetensors checkpoint, with lazily opened, cached handles."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.exists():
                path = index
            elif single.exists():
                path = single
            else:
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise ValueError(
                        f"{path} has no model.safetensors or model.safetensors.index.json and "
                        f"{len(files)} .safetensors files; pass the file or the index"
                    )
                path = files[0]
        if not path.exists():
            raise ValueError(f"checkpoint {path} does not exist")
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        if path.suffix == ".json":
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not a safetensors index (needs a 'weight_map' object)") from e
            self.files = {name: path.parent / f for name, f in weight_map.items()}
        else:
            self.files = {name: path for name in self._open(path).keys()}  # noqa: SIM118
        self.origin = path

    def _open(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            if not file.exists():
                raise ValueError(f"checkpoint shard {file} (listed in {self.origin}) does not exist")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                listed = f" (listed in {self.origin})" if getattr(self, "origin", file) != file else ""
                raise ValueError(
                    f"{file}{listed} is not a readable safetensors file ({e}); it is corrupt, truncated "
                    "or in another format: re-download or re-export it (safetensors.torch.save_file)"
                ) from e
            h = self._handles[file] = self._stack.enter_context(handle)
        return h

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> str:
        """The file holding `name` (for messages)."""
        return str(self.files.get(name, self.origin))

    def _slice(self, name: str) -> Any:
        if name not in self.files:
            raise ValueError(f"tensor {name!r} is missing from checkpoint {self.origin}")
        handle = self._open(self.files[name])
        try:
            return handle.get_slice(name)
        except SafetensorError as e:
            raise ValueError(f"{name} in {self.files[name]} cannot be read ({e}); the file is corrupt: "
                             "re-download or re-export it") from e

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        s = self._slice(name)
        return s.get_dtype(), tuple(s.get_shape())

    def read(self, name: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """The tensor, or rows [lo, hi) of its leading dim (only those bytes are read)."""
        sl = self._slice(name)  # a clear error when missing
        try:
            return self._open(self.files[name]).get_tensor(name) if lo is None else sl[lo:hi]
        except SafetensorError as e:
            raise ValueError(f"{name} in {self.files[name]} cannot be read ({e}); the file is corrupt: "
                             "re-download or re-export it") from e


def _fail(files: CheckpointFiles, name: str, problem: str, fix: str = "") -> ValueError:
    return ValueError(f"{name} in {files.where(name)}: {problem}" + (f"; {fix}" if fix else ""))


def _expect(files: CheckpointFiles, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> None:
    """Raise unless `name` exists with one of `dtypes` and the given shape (None: any numel-1 scalar)."""
    if name not in files:
        raise ValueError(
            f"tensor {name!r} is missing from checkpoint {files.origin}; check the layer index, "
            "the number of experts and that the checkpoint is complete"
        )
    dt, sh = files.info(name)
    if dt not in dtypes:
        raise _fail(files, name, f"dtype {dt}, expected {' or '.join(dtypes)}")
    if shape is None:
        if math.prod(sh) != 1:
            raise _fail(files, name, f"shape {list(sh)}, expected a scalar (one value)")
    elif sh != shape:
        raise _fail(files, name, f"shape {list(sh)}, expected {list(shape)}", "check MoEConfig hidden/intermediate")


def _check_scale(files: CheckpointFiles, name: str, t: torch.Tensor, allow_zero: bool = False) -> torch.Tensor:
    v = t.float()
    if not bool(torch.isfinite(v).all()):
        raise _fail(files, name, "scale contains NaN or inf", "the checkpoint is corrupt; re-export it")
    if bool((v < 0).any()) or (not allow_zero and bool((v == 0).any())):
        raise _fail(files, name, "scale contains zero or negative values", "the checkpoint is corrupt; re-export it")
    return t


@dataclass
class MoELayerWeights:
    """One MoE layer as loaded for one rank.

    experts:         this rank's experts by local index (global ids in `expert_ids`).
    expert_ids:      [E_local] int64 global expert ids.
    format:          the experts' format as loaded (ExpertWeights.format): their dtype for
                     unquantized weights ("bf16", "fp16", "fp32"), else "fp8", "fp8_block" or "nvfp4".
    gate:            [E, H] router weight (checkpoint dtype) or None.
    gate_bias:       [E] router bias (GPT-OSS) or None.
    correction_bias: [E] fp32 `e_score_correction_bias` or None.
    shared:          shared experts (dequantized) or None.
    input_scales:    static activation scales (fp8 / nvfp4 checkpoints with `input_scale`):
                     {"w13": [E_local] fp32, "w2": [E_local] fp32}; zeros replaced (see loader).
                     Not applied to the experts (epmoe quantizes activations with dynamic
                     scales); exposed for payload quantization with one static scale shared by
                     every rank (the max, as the comm backend's `input_scale` option).
    """

    experts: ExpertWeights
    expert_ids: torch.Tensor
    format: str
    gate: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    shared: SharedExperts | None = None
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- layer discovery ---------------------------------------------------------------------------


@dataclass
class _Layout:
    moe: str  # e.g. "model.layers.3.mlp"
    scheme: str  # "hf" | "mixtral" | "fused"
    format: str


def _find_layout(files: CheckpointFiles, layer: int) -> _Layout:
    pat = re.compile(rf"^((?:.*\.)?layers\.{layer}\.(?:mlp|block_sparse_moe))\.experts\.")
    moe = next((m.group(1) for n in files.files if (m := pat.match(n))), None)
    if moe is None:
        near = [n for n in files.files if f"layers.{layer}." in n][:6]
        raise ValueError(
            f"cannot recognise MoE layer {layer} in {files.origin}: no 'layers.{layer}.mlp.experts.*' or "
            f"'layers.{layer}.block_sparse_moe.experts.*' tensors (names in that layer: {near or 'none'}); "
            "check the layer index (dense layers have no experts) or the checkpoint"
        )
    for scheme, (g, _, _) in _PROJ.items():
        w = f"{moe}.experts.0.{g}.weight"
        if w in files:
            return _Layout(moe, scheme, _weight_format(files, f"{moe}.experts.0.{g}"))
    fused = f"{moe}.experts.gate_up_proj"
    if fused in files:
        dt, _ = files.info(fused)
        if dt not in _FLOAT:
            raise _fail(files, fused, f"fused expert tensor of dtype {dt}", "only bf16/fp16/fp32 fused tensors load")
        return _Layout(moe, "fused", "bf16")
    if f"{moe}.experts.gate_up_proj_blocks" in files:
        raise _fail(files, f"{moe}.experts.gate_up_proj_blocks", "MXFP4 expert weights are not supported",
                    "use a bf16 export of the model")
    sample = [n for n in files.files if n.startswith(f"{moe}.experts.")][:4]
    raise ValueError(
        f"cannot recognise the expert naming of {moe} in {files.origin} (e.g. {sample}); expected "
        "experts.{e}.gate_proj.weight, experts.{e}.w1.weight or experts.gate_up_proj"
    )


def _weight_format(files: CheckpointFiles, proj: str) -> str:
    w = f"{proj}.weight"
    dt, _ = files.info(w)
    has = {s: f"{proj}.{s}" in files for s in ("weight_scale_inv", "weight_scale", "weight_scale_2")}
    if dt in _FLOAT and not any(has.values()):
        return "bf16"
    if dt == "F8_E4M3" and has["weight_scale_inv"]:
        return "fp8_block"
    if dt == "F8_E4M3" and has["weight_scale"] and not has["weight_scale_2"]:
        return "fp8"
    if dt == "U8" and has["weight_scale"] and has["weight_scale_2"]:
        return "nvfp4"
    siblings = sorted(n.rsplit(".", 1)[1] for n in files.files if n.startswith(proj + "."))
    raise _fail(
        files, w,
        f"cannot recognise the weight format (dtype {dt}, tensors {siblings})",
        "supported: float weight; F8_E4M3 weight + weight_scale_inv (DeepSeek fp8 blocks); F8_E4M3 "
        "weight + weight_scale (fp8 per-tensor); U8 weight + weight_scale + weight_scale_2 (ModelOpt nvfp4)",
    )


# ---- per-projection reading ----------------------------------------------------------------------


@dataclass
class _Proj:
    """One [N, K] projection as read: data plus format-specific scales."""

    data: torch.Tensor  # bf16: [N, K] float; fp8*: [N, K] e4m3; nvfp4: [N, K/2] uint8
    scales: torch.Tensor | None = None  # fp8: [1] fp32; fp8_block: [N/rows, K/128]; nvfp4: [N, K/16] e4m3
    global_scale: torch.Tensor | None = None  # nvfp4: [] fp32
    input_scale: torch.Tensor | None = None  # fp8 / nvfp4: [] fp32 when present
    block_rows: int = FP8_BLOCK  # fp8_block: rows per scale (1 after fusing gate/up off the 128 grid)

    def dequantize(self, fmt: str, dtype: torch.dtype) -> torch.Tensor:
        return self.data.to(dtype) if fmt == "bf16" else _stack([self], fmt).dequantize(dtype)[0]


def _expect_proj(files: CheckpointFiles, proj: str, fmt: str, N: int, K: int) -> None:
    """Check the names, dtypes and shapes of one [N, K] projection in `fmt` (header only)."""
    w = f"{proj}.weight"
    if fmt == "bf16":
        _expect(files, w, _FLOAT, (N, K))
    elif fmt == "fp8_block":
        _expect(files, w, ("F8_E4M3",), (N, K))
        _expect(files, f"{proj}.weight_scale_inv", ("F32",), (cdiv(N, FP8_BLOCK), cdiv(K, FP8_BLOCK)))
    elif fmt == "fp8":
        _expect(files, w, ("F8_E4M3",), (N, K))
        _expect(files, f"{proj}.weight_scale", ("F32",), None)
    else:
        if K % NVFP4_BLOCK:
            raise _fail(files, w, f"nvfp4 needs the reduction dim {K} to be a multiple of 16")
        _expect(files, w, ("U8",), (N, K // 2))
        _expect(files, f"{proj}.weight_scale", ("F8_E4M3",), (N, K // NVFP4_BLOCK))
        _expect(files, f"{proj}.weight_scale_2", ("F32",), None)
    if fmt in ("fp8", "nvfp4") and f"{proj}.input_scale" in files:
        _expect(files, f"{proj}.input_scale", ("F32",), None)


def _read_proj(files: CheckpointFiles, proj: str, fmt: str, N: int, K: int) -> _Proj:
    _expect_proj(files, proj, fmt, N, K)
    data = files.read(f"{proj}.weight")
    if fmt == "bf16":
        return _Proj(data)
    if fmt == "fp8_block":
        s = f"{proj}.weight_scale_inv"
        return _Proj(data, _check_scale(files, s, files.read(s)))
    inp = f"{proj}.input_scale"
    input_scale = None
    if inp in files:
        input_scale = _check_scale(files, inp, files.read(inp).reshape(()), allow_zero=True)
    if fmt == "fp8":
        s = f"{proj}.weight_scale"
        return _Proj(data, _check_scale(files, s, files.read(s).reshape(1)), None, input_scale)
    s, s2 = f"{proj}.weight_scale", f"{proj}.weight_scale_2"
    block = files.read(s)
    if bool(torch.isnan(block.float()).any()):
        raise _fail(files, s, "block scales contain NaN", "the checkpoint is corrupt; re-export it")
    g = _check_scale(files, s2, files.read(s2).reshape(()))
    return _Proj(data, block, g, input_scale)


def _stack(projs: list[_Proj], fmt: str) -> Any:
    """Stack per-expert projections [N, K] into [E, N, K] (a QuantizedTensor unless bf16).

    projs: one per expert. (For w13, call with gate+up already fused by `_fuse`.)
    """
    if fmt == "bf16":
        return torch.stack([p.data for p in projs])
    data = torch.stack([p.data for p in projs])
    E, N = data.shape[0], data.shape[1]
    if fmt == "fp8_block":
        block = (1, projs[0].block_rows, FP8_BLOCK)
        return QuantizedTensor(data, torch.stack([p.scales for p in projs]), block, fmt)
    K = data.shape[2] * (2 if fmt == "nvfp4" else 1)
    if fmt == "fp8":
        # per-tensor scales; a fused gate/up tensor has 2 (one per half): [E, n_parts, 1]
        scales = torch.stack([p.scales.reshape(-1) for p in projs]).float()  # [E, parts]
        parts = scales.shape[1]
        return QuantizedTensor(data, scales.reshape(E, parts, 1).contiguous(), (1, N // parts, K), fmt)
    scales = torch.stack([p.scales for p in projs])  # [E, N, K/16] e4m3
    g = torch.stack([p.global_scale.reshape(-1, 1) for p in projs]).float()  # [E, N or 1, 1]
    return QuantizedTensor(data, scales, (1, 1, NVFP4_BLOCK), fmt, g.contiguous())


def _fuse(gate: _Proj, up: _Proj, fmt: str, files: CheckpointFiles, name: str) -> _Proj:
    """gate [I, K] and up [I, K] -> w13 [2I, K], gate rows first, scales carried along."""
    data = torch.cat([gate.data, up.data])
    if fmt == "bf16":
        return _Proj(data)
    if fmt == "fp8_block":
        I = gate.data.shape[0]
        if I % FP8_BLOCK == 0:
            return _Proj(data, torch.cat([gate.scales, up.scales]))
        # up's rows start at I, off the 128-row grid: keep the exact scales, one per row
        # ([2I, K/128], block rows 1); the triton preprocessing puts them back on the grid.
        rows = [p.scales.repeat_interleave(FP8_BLOCK, dim=0)[:I] for p in (gate, up)]
        return _Proj(data, torch.cat(rows), block_rows=1)
    if fmt == "fp8":
        return _Proj(data, torch.cat([gate.scales.reshape(1), up.scales.reshape(1)]))
    # nvfp4: gate and up may have different global scales -> one per row
    I = gate.data.shape[0]
    g = torch.cat([gate.global_scale.reshape(1).expand(I), up.global_scale.reshape(1).expand(I)])
    return _Proj(data, torch.cat([gate.scales, up.scales]), g)


# ---- header-only validation --------------------------------------------------------------------


def validate_layer(path: str | Path | CheckpointFiles, cfg: MoEConfig, layer: int) -> str:
    """Check names, dtypes and shapes of every expert, router and shared-expert tensor of MoE
    layer `layer` against `cfg` without reading any data; return the weight format.
    Raises ValueError naming the first bad tensor and its file."""
    files = path if isinstance(path, CheckpointFiles) else CheckpointFiles(path)
    try:
        lay = _find_layout(files, layer)
        _check_expert_count(files, lay, cfg.num_experts)
        H, I = cfg.hidden, cfg.intermediate
        if lay.scheme == "fused":
            gpt_oss = cfg.activation == "swiglu_clamped"
            E = cfg.num_experts
            _expect(files, f"{lay.moe}.experts.gate_up_proj", _FLOAT, (E, H, 2 * I) if gpt_oss else (E, 2 * I, H))
            _expect(files, f"{lay.moe}.experts.down_proj", _FLOAT, (E, I, H) if gpt_oss else (E, H, I))
        else:
            gn, un, dn = _PROJ[lay.scheme]
            for e in range(cfg.num_experts):
                base = f"{lay.moe}.experts.{e}"
                _expect_proj(files, f"{base}.{gn}", lay.format, I, H)
                _expect_proj(files, f"{base}.{un}", lay.format, I, H)
                _expect_proj(files, f"{base}.{dn}", lay.format, H, I)
        for name in (f"{lay.moe}.gate.weight", f"{lay.moe}.router.weight"):
            if name in files:
                _expect(files, name, _FLOAT, (cfg.num_experts, H))
        for name in (f"{lay.moe}.gate.e_score_correction_bias", f"{lay.moe}.e_score_correction_bias"):
            if name in files:
                _expect(files, name, _FLOAT, (cfg.num_experts,))
        if cfg.shared_experts:
            base = next((b for b in (f"{lay.moe}.shared_experts", f"{lay.moe}.shared_expert")
                         if f"{b}.gate_proj.weight" in files), f"{lay.moe}.shared_experts")
            S = cfg.shared_width
            fmt = _weight_format(files, f"{base}.gate_proj") if f"{base}.gate_proj.weight" in files else lay.format
            for p, (N, K) in (("gate_proj", (S, H)), ("up_proj", (S, H)), ("down_proj", (H, S))):
                _expect_proj(files, f"{base}.{p}", fmt, N, K)
        return lay.format
    finally:
        if not isinstance(path, CheckpointFiles):
            files.close()


# ---- the loader -------------------------------------------------------------------------------------


def load_moe_layer(
    path: str | Path,
    cfg: MoEConfig,
    layer: int,
    rank: int = 0,
    world: int = 1,
    placement: Placement | None = None,
    runner: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    check_finite: bool = True,
) -> MoELayerWeights:
    """Read MoE layer `layer` of the checkpoint at `path` for EP rank `rank` of `world`.

    Experts come by local index of `placement` (default `Placement.contiguous(E, world)`).
    dtype: cast float weights (bf16 checkpoints, shared experts) to it; default: as stored
    (shared experts of quantized checkpoints: fp32). Quantized weights keep their format.
    runner: applies that runner's load-time `prepare`; "auto" (the default) is
    the runner `MoELayer(runner="auto")` picks for `device` and the checkpoint's format
    (select.pick_runner: triton on CUDA, reference on the CPU). Build the layer with the same
    runner.
    Static activation scales (`input_scale`) come back in `input_scales`; they are not applied
    to the experts, which quantize nothing (see the module docstring).
    check_finite: raise a ValueError naming the expert when this rank's float (bf16 / fp16 / fp32)
    expert weights or biases hold NaN or inf (one read of each, before any cast); False skips it.
    """
    E = cfg.num_experts
    if placement is None:
        if E % world:
            raise ValueError(
                f"the layer has {E} experts, not divisible by the EP world size {world}; choose a "
                f"world size that divides {E} or pass a Placement"
            )
        placement = Placement.contiguous(E, world)
    if not 0 <= rank < placement.world or placement.num_experts != E:
        raise ValueError(f"rank {rank} / placement of {placement.num_experts} experts on {placement.world} ranks "
                         f"does not fit a layer of {E} experts")
    ids = placement.global_ids(rank)  # [E_local] int64
    files = CheckpointFiles(path)
    try:
        lay = _find_layout(files, layer)
        _check_expert_count(files, lay, E)
        if lay.scheme == "fused":
            experts = _load_fused(files, lay, cfg, ids)
            input_scales: dict[str, torch.Tensor] = {}
        else:
            experts, input_scales = _load_per_expert(files, lay, cfg, ids)
        if check_finite:
            _check_finite(files, lay, experts, ids)
        if dtype is not None and lay.format == "bf16":  # unquantized, in any float dtype
            experts = ExpertWeights(experts.w13.to(dtype), experts.w2.to(dtype), experts.b13, experts.b2)
        out = MoELayerWeights(experts, ids, experts.format, input_scales=input_scales)
        _load_router(files, lay, cfg, out)
        out.shared = _load_shared(files, lay, cfg, dtype or (None if lay.format == "bf16" else torch.float32))
    finally:
        files.close()
    out.experts.check(cfg, placement.local_experts)
    if runner == "auto":
        runner = pick_runner(torch.device(device).type, out.experts.format)
    out.experts = get_runner(runner).prepare(_to(out.experts, device), cfg)
    for name in ("gate", "gate_bias", "correction_bias"):
        t = getattr(out, name)
        if t is not None:
            setattr(out, name, t.to(device))
    if out.shared is not None:
        out.shared = SharedExperts(out.shared.w13.to(device), out.shared.w2.to(device))
    out.input_scales = {k: v.to(device) for k, v in out.input_scales.items()}
    return out


def _check_finite(files: CheckpointFiles, lay: _Layout, experts: ExpertWeights, ids: torch.Tensor) -> None:
    """ValueError naming the first expert whose float weights or biases hold NaN or inf (quantized
    weights: their scales are checked as they are read)."""
    named = {"w13 (gate/up)": experts.w13, "w2 (down)": experts.w2, "b13": experts.b13, "b2": experts.b2}
    for what, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            continue
        bad = ~torch.isfinite(t).flatten(1).all(dim=1)  # [E_local]
        if bool(bad.any()):
            e = int(ids[int(bad.nonzero()[0])])
            raise ValueError(f"{lay.moe} in {files.origin}: expert {e}'s {what} weights hold NaN or inf; "
                             "the checkpoint is corrupt (re-export it), or pass check_finite=False to load anyway")


def _to(w: ExpertWeights, device: torch.device | str) -> ExpertWeights:
    mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return ExpertWeights(w.w13.to(device), w.w2.to(device), mv(w.b13), mv(w.b2))


def _check_expert_count(files: CheckpointFiles, lay: _Layout, E: int) -> None:
    if lay.scheme == "fused":
        name = f"{lay.moe}.experts.gate_up_proj"
        n = files.info(name)[1][0]
        if n != E:
            raise _fail(files, name, f"holds {n} experts, MoEConfig.num_experts is {E}", "fix the config")
        return
    g = _PROJ[lay.scheme][0]
    if f"{lay.moe}.experts.{E - 1}.{g}.weight" not in files or f"{lay.moe}.experts.{E}.{g}.weight" in files:
        n = sum(1 for k in files.files if re.fullmatch(rf"{re.escape(lay.moe)}\.experts\.\d+\.{g}\.weight", k))
        raise ValueError(
            f"{lay.moe} in {files.origin} has {n} experts, MoEConfig.num_experts is {E}; fix the config "
            "or the layer index"
        )


def _load_per_expert(
    files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, ids: torch.Tensor
) -> tuple[ExpertWeights, dict[str, torch.Tensor]]:
    H, I, fmt = cfg.hidden, cfg.intermediate, lay.format
    gn, un, dn = _PROJ[lay.scheme]
    w13, w2 = [], []
    for e in ids.tolist():
        base = f"{lay.moe}.experts.{e}"
        gate = _read_proj(files, f"{base}.{gn}", fmt, I, H)
        up = _read_proj(files, f"{base}.{un}", fmt, I, H)
        w13.append(_fuse(gate, up, fmt, files, f"{base}.{gn}.weight"))
        w13[-1].input_scale = _max_or_none(gate.input_scale, up.input_scale)
        w2.append(_read_proj(files, f"{base}.{dn}", fmt, H, I))
    b13 = b2 = None
    if cfg.has_bias:
        b13 = torch.stack([torch.cat([_read_bias(files, f"{lay.moe}.experts.{e}.{gn}.bias", I),
                                      _read_bias(files, f"{lay.moe}.experts.{e}.{un}.bias", I)]) for e in ids.tolist()])
        b2 = torch.stack([_read_bias(files, f"{lay.moe}.experts.{e}.{dn}.bias", H) for e in ids.tolist()])
    weights = ExpertWeights(_stack(w13, fmt), _stack(w2, fmt), b13, b2)
    scales: dict[str, torch.Tensor] = {}
    if fmt in ("fp8", "nvfp4") and all(p.input_scale is not None for p in w13 + w2):
        scales = {
            "w13": _fix_input_scales(files, lay, cfg, ids, [p.input_scale for p in w13], (gn, un), "w13"),
            "w2": _fix_input_scales(files, lay, cfg, ids, [p.input_scale for p in w2], (dn,), "w2"),
        }
    return weights, scales


def _max_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.maximum(a, b)


def _read_bias(files: CheckpointFiles, name: str, n: int) -> torch.Tensor:
    _expect(files, name, _FLOAT, (n,))
    return files.read(name).float()


def _fix_input_scales(
    files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, ids: torch.Tensor,
    local: list[torch.Tensor], projs: tuple[str, ...], what: str,
) -> torch.Tensor:
    """[E_local] static input scales; a zero (an expert calibration never reached) is replaced by
    the layer's maximum over all experts, with a warning naming the experts. A zero scale would
    otherwise make quantization divide by zero (NaN outputs)."""
    s = torch.stack(local).float()  # [E_local]
    zero = (s == 0).nonzero().flatten()
    if zero.numel():
        every = [
            files.read(f"{lay.moe}.experts.{e}.{p}.input_scale").float().reshape(())
            for e in range(cfg.num_experts) for p in projs
        ]
        layer_max = torch.stack(every).max()
        if not layer_max > 0:
            raise _fail(files, f"{lay.moe}.experts.0.{projs[0]}.input_scale",
                        f"every {what} input_scale of the layer is zero", "recalibrate the checkpoint")
        names = [int(ids[i]) for i in zero.tolist()]
        warnings.warn(
            f"{lay.moe}: experts {names} have a zero {what} input_scale (never calibrated) in "
            f"{files.origin}; using the layer maximum {float(layer_max):.6g}",
            stacklevel=4,
        )
        s[zero] = layer_max
    return s


def _load_fused(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, ids: torch.Tensor) -> ExpertWeights:
    """transformers v5 fused [E, ...] tensors; GPT-OSS layout when the activation is swiglu_clamped."""
    H, I, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    gu, dn = f"{lay.moe}.experts.gate_up_proj", f"{lay.moe}.experts.down_proj"
    gpt_oss = cfg.activation == "swiglu_clamped"
    _expect(files, gu, _FLOAT, (E, H, 2 * I) if gpt_oss else (E, 2 * I, H))
    _expect(files, dn, _FLOAT, (E, I, H) if gpt_oss else (E, H, I))

    def rows(name: str) -> torch.Tensor:
        lo, hi = int(ids.min()), int(ids.max()) + 1
        if torch.equal(ids, torch.arange(lo, hi)):
            return files.read(name, lo, hi)  # contiguous placement: one slice
        return torch.stack([files.read(name, e, e + 1)[0] for e in ids.tolist()])

    if not gpt_oss:
        return ExpertWeights(rows(gu), rows(dn))
    _expect(files, f"{gu}_bias", _FLOAT, (E, 2 * I))
    _expect(files, f"{dn}_bias", _FLOAT, (E, H))
    return gpt_oss_experts(rows(gu), rows(f"{gu}_bias"), rows(dn), rows(f"{dn}_bias"))


def gpt_oss_experts(gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                    down_bias: torch.Tensor) -> ExpertWeights:
    """HF GPT-OSS expert tensors in our layout (used by the loader and by integrations/hf.py).

    HF computes x @ gate_up [H, 2I] with gate = columns 0::2, up = columns 1::2, then
    act @ down [I, H]. gate_up [E, H, 2I], gate_up_bias [E, 2I], down [E, I, H], down_bias [E, H]
    -> w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], fp32 biases b13 [E, 2I], b2 [E, H];
    new contiguous tensors for the weights and b13.
    """
    w13 = gate_up.transpose(1, 2)  # [E, 2I, H] interleaved rows
    w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1).contiguous()  # gate rows | up rows
    b13 = gate_up_bias.float()
    b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1).contiguous()  # [E, 2I]
    return ExpertWeights(w13, down.transpose(1, 2).contiguous(), b13, down_bias.float())


def _load_router(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, out: MoELayerWeights) -> None:
    E, H = cfg.num_experts, cfg.hidden
    for name in (f"{lay.moe}.gate.weight", f"{lay.moe}.router.weight"):
        if name in files:
            _expect(files, name, _FLOAT, (E, H))
            out.gate = files.read(name)
            bias = name[: -len("weight")] + "bias"
            if bias in files:
                _expect(files, bias, _FLOAT, (E,))
                out.gate_bias = files.read(bias).float()
            break
    for name in (f"{lay.moe}.gate.e_score_correction_bias", f"{lay.moe}.e_score_correction_bias"):
        if name in files:
            _expect(files, name, _FLOAT, (E,))
            out.correction_bias = files.read(name).float()
            if not bool(torch.isfinite(out.correction_bias).all()):
                raise _fail(files, name, "contains NaN or inf", "the checkpoint is corrupt")
            break
    if cfg.uses_correction_bias and out.correction_bias is None:
        raise ValueError(
            f"routing {cfg.routing!r} needs {lay.moe}.gate.e_score_correction_bias, missing from {files.origin}"
        )


def _load_shared(
    files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, dtype: torch.dtype | None
) -> SharedExperts | None:
    if f"{lay.moe}.shared_expert_gate.weight" in files and cfg.shared_experts:
        raise _fail(files, f"{lay.moe}.shared_expert_gate.weight",
                    "a sigmoid-gated shared expert (Qwen2-MoE) is not supported by SharedExperts")
    base = next((b for b in (f"{lay.moe}.shared_experts", f"{lay.moe}.shared_expert")
                 if f"{b}.gate_proj.weight" in files), None)
    if not cfg.shared_experts:
        if base is not None:
            warnings.warn(f"{base} in {files.origin} is ignored: MoEConfig.shared_experts is 0", stacklevel=3)
        return None
    if base is None:
        raise ValueError(
            f"MoEConfig has {cfg.shared_experts} shared experts but {files.origin} has no "
            f"{lay.moe}.shared_experts.gate_proj.weight; fix the config or the layer index"
        )
    S, H = cfg.shared_width, cfg.hidden
    fmt = _weight_format(files, f"{base}.gate_proj")
    parts = {p: _read_proj(files, f"{base}.{p}", fmt, *(H, S) if p == "down_proj" else (S, H))
             for p in ("gate_proj", "up_proj", "down_proj")}
    deq = {p: v.dequantize(fmt, dtype or (v.data.dtype if fmt == "bf16" else torch.float32))
           for p, v in parts.items()}
    return SharedExperts(torch.cat([deq["gate_proj"], deq["up_proj"]]), deq["down_proj"])
