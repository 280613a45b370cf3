"""Load one MoE layer of a safetensors checkpoint: this rank's experts only.

    ckpt = load_moe_layer("path/to/model", cfg, layer=3, rank=r, world=W)
    layer = MoELayer(cfg, ckpt.experts, group, gate=ckpt.gate, gate_bias=ckpt.gate_bias,
                     correction_bias=ckpt.correction_bias, shared=ckpt.shared)

`path`: a folder (`model.safetensors` or its `.index.json`), one `.safetensors` file or an index; only
this rank's tensors (of fused 3-D tensors, its expert slices) are read. Names and formats (bf16,
DeepSeek-V3 fp8_block, ModelOpt fp8 / nvfp4, recognised by `_weight_format`): docs/formats.md. Shared
experts are dequantized; the runner's `prepare` runs once at the end; static `input_scale`s are not
applied (`MoELayerWeights.input_scales` returns them for payload quantization).
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
from epmoe.eplb import ReplicaPlan
from epmoe.experts import ExpertWeights, get_runner
from epmoe.group import Placement
from epmoe.layer import SharedExperts
from epmoe.quant import FP8_BLOCK, NVFP4_BLOCK, QuantizedTensor
from epmoe.select import pick_runner
from epmoe.util import cdiv

_FLOAT = ("BF16", "F16", "F32")
# projection names per naming scheme: (gate, up, down)
_PROJ = {"hf": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


class CheckpointFiles:
    """Name -> file map of a safetensors checkpoint, with lazily opened, cached handles."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            files = [path / "model.safetensors.index.json", path / "model.safetensors"]
            files = [f for f in files if f.exists()][:1] or sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json and "
                                 f"{len(files)} .safetensors files; pass the file or the index")
            path = files[0]
        if not path.exists():
            raise ValueError(f"checkpoint {path} does not exist")
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        self.origin = path
        if path.suffix == ".json":
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not a safetensors index (needs a 'weight_map' object)") from e
            self.files = {name: path.parent / f for name, f in weight_map.items()}
        else:
            self.files = {name: path for name in self._open(path).keys()}  # noqa: SIM118

    def _open(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            listed = f" (listed in {self.origin})" if self.origin != file else ""
            if not file.exists():
                raise ValueError(f"checkpoint shard {file}{listed} does not exist")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file}{listed} is not a readable safetensors file ({e}); it is corrupt, "
                                 "truncated or in another format: re-download or re-export it "
                                 "(safetensors.torch.save_file)") from e
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

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        s = self._get(name, lambda h: h.get_slice(name))
        return s.get_dtype(), tuple(s.get_shape())

    def read(self, name: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """The tensor, or rows [lo, hi) of its leading dim (only those bytes are read)."""
        return self._get(name, lambda h: h.get_tensor(name) if lo is None else h.get_slice(name)[lo:hi])

    def _get(self, name: str, fn: Any) -> Any:
        """fn(handle of the file holding `name`), with one error for a missing tensor or a corrupt file."""
        if name not in self.files:
            raise ValueError(f"tensor {name!r} is missing from checkpoint {self.origin}; check the layer index, "
                             "the number of experts and that the checkpoint is complete")
        handle = self._open(self.files[name])
        try:
            return fn(handle)
        except SafetensorError as e:
            raise ValueError(f"{name} in {self.files[name]} cannot be read ({e}); the file is corrupt: "
                             "re-download or re-export it") from e


def _fail(files: CheckpointFiles, name: str, problem: str, fix: str = "") -> ValueError:
    return ValueError(f"{name} in {files.where(name)}: {problem}" + (f"; {fix}" if fix else ""))


def _expect(files: CheckpointFiles, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> None:
    """Raise unless `name` exists with one of `dtypes` and the given shape (None: any numel-1 scalar)."""
    dt, sh = files.info(name)
    if dt not in dtypes:
        raise _fail(files, name, f"dtype {dt}, expected {' or '.join(dtypes)}")
    if shape is None and math.prod(sh) != 1:
        raise _fail(files, name, f"shape {list(sh)}, expected a scalar (one value)")
    if shape is not None and sh != shape:
        raise _fail(files, name, f"shape {list(sh)}, expected {list(shape)}", "check MoEConfig hidden/intermediate")


def _check_scale(files: CheckpointFiles, name: str, t: torch.Tensor, allow_zero: bool = False) -> torch.Tensor:
    v = t.float()
    if not bool(torch.isfinite(v).all()):
        raise _fail(files, name, "scale contains NaN or inf", "the checkpoint is corrupt; re-export it")
    if bool((v < 0).any()) or (not allow_zero and bool((v == 0).any())):
        raise _fail(files, name, "scale contains zero or negative values", "the checkpoint is corrupt; re-export it")
    return t


def _first(files: CheckpointFiles, *names: str) -> str | None:
    return next((n for n in names if n in files), None)


@dataclass
class MoELayerWeights:
    """One MoE layer as loaded for one rank (`input_scales`: see the module docstring)."""

    experts: ExpertWeights  # this rank's experts by local index
    expert_ids: torch.Tensor  # [E_local] int64 global expert ids (with replicas: the expert of each slot)
    format: str  # ExpertWeights.format: "bf16" / "fp16" / "fp32" (unquantized), "fp8", "fp8_block", "nvfp4"
    gate: torch.Tensor | None = None  # [E, H] router weight, checkpoint dtype
    gate_bias: torch.Tensor | None = None  # [E] router bias (GPT-OSS)
    correction_bias: torch.Tensor | None = None  # [E] fp32 e_score_correction_bias
    shared: SharedExperts | None = None  # shared experts, dequantized
    # static activation scales {"w13": [E_local] fp32, "w2": [E_local] fp32}, zeros replaced; not applied
    # to the experts: pass their max as the comm backend's `input_scale` option
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)


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
        raise ValueError(f"cannot recognise MoE layer {layer} in {files.origin}: no 'layers.{layer}.mlp.experts.*' "
                         f"or 'layers.{layer}.block_sparse_moe.experts.*' tensors (names in that layer: "
                         f"{near or 'none'}); check the layer index (dense layers have no experts) or the checkpoint")
    for scheme, (g, _, _) in _PROJ.items():
        if f"{moe}.experts.0.{g}.weight" in files:
            return _Layout(moe, scheme, _weight_format(files, f"{moe}.experts.0.{g}"))
    fused = f"{moe}.experts.gate_up_proj"
    if fused in files:
        dt, _ = files.info(fused)
        if dt not in _FLOAT:
            raise _fail(files, fused, f"fused expert tensor of dtype {dt}", "only bf16/fp16/fp32 fused tensors load")
        return _Layout(moe, "fused", "bf16")
    if f"{fused}_blocks" in files:
        raise _fail(files, f"{fused}_blocks", "MXFP4 expert weights are not supported",
                    "use a bf16 export of the model")
    sample = [n for n in files.files if n.startswith(f"{moe}.experts.")][:4]
    raise ValueError(f"cannot recognise the expert naming of {moe} in {files.origin} (e.g. {sample}); expected "
                     "experts.{e}.gate_proj.weight, experts.{e}.w1.weight or experts.gate_up_proj")


def _weight_format(files: CheckpointFiles, proj: str) -> str:
    dt, _ = files.info(f"{proj}.weight")
    inv, s, s2 = (f"{proj}.{s}" in files for s in ("weight_scale_inv", "weight_scale", "weight_scale_2"))
    if dt in _FLOAT and not (inv or s or s2):
        return "bf16"
    if dt == "F8_E4M3" and (inv or (s and not s2)):
        return "fp8_block" if inv else "fp8"
    if dt == "U8" and s and s2:
        return "nvfp4"
    siblings = sorted(n.rsplit(".", 1)[1] for n in files.files if n.startswith(proj + "."))
    raise _fail(files, f"{proj}.weight", f"cannot recognise the weight format (dtype {dt}, tensors {siblings})",
                "supported: float weight; F8_E4M3 weight + weight_scale_inv (DeepSeek fp8 blocks); F8_E4M3 weight "
                "+ weight_scale (fp8 per-tensor); U8 weight + weight_scale + weight_scale_2 (ModelOpt nvfp4)")


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
        raise ValueError(f"{lay.moe} in {files.origin} has {n} experts, MoEConfig.num_experts is {E}; fix the "
                         "config or the layer index")


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


def _proj_tensors(fmt: str, N: int, K: int) -> tuple[tuple[str, tuple[str, ...], tuple[int, ...] | None], ...]:
    """(suffix, dtypes, shape or None for a scalar) of the tensors of one [N, K] projection in `fmt`:
    fp8_block as DeepSeek-V3, fp8 and nvfp4 as ModelOpt (+ an optional fp32 scalar `input_scale`)."""
    return {
        "bf16": (("weight", _FLOAT, (N, K)),),
        "fp8_block": (("weight", ("F8_E4M3",), (N, K)),
                      ("weight_scale_inv", ("F32",), (cdiv(N, FP8_BLOCK), cdiv(K, FP8_BLOCK)))),
        "fp8": (("weight", ("F8_E4M3",), (N, K)), ("weight_scale", ("F32",), None)),
        "nvfp4": (("weight", ("U8",), (N, K // 2)), ("weight_scale", ("F8_E4M3",), (N, K // NVFP4_BLOCK)),
                  ("weight_scale_2", ("F32",), None)),
    }[fmt]


def _expect_proj(files: CheckpointFiles, proj: str, fmt: str, N: int, K: int) -> None:
    """Check the names, dtypes and shapes of one [N, K] projection in `fmt` (header only)."""
    if fmt == "nvfp4" and K % NVFP4_BLOCK:
        raise _fail(files, f"{proj}.weight", f"nvfp4 needs the reduction dim {K} to be a multiple of 16")
    for suffix, dtypes, shape in _proj_tensors(fmt, N, K):
        _expect(files, f"{proj}.{suffix}", dtypes, shape)
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
    input_scale = _check_scale(files, inp, files.read(inp).reshape(()), allow_zero=True) if inp in files else None
    s, s2 = f"{proj}.weight_scale", f"{proj}.weight_scale_2"
    if fmt == "fp8":
        return _Proj(data, _check_scale(files, s, files.read(s).reshape(1)), None, input_scale)
    block = files.read(s)
    if bool(torch.isnan(block.float()).any()):
        raise _fail(files, s, "block scales contain NaN", "the checkpoint is corrupt; re-export it")
    return _Proj(data, block, _check_scale(files, s2, files.read(s2).reshape(())), input_scale)


def _stack(projs: list[_Proj], fmt: str) -> Any:
    """Per-expert projections [N, K] -> [E, N, K] (a QuantizedTensor unless bf16); w13: fused by `_fuse` first."""
    data = torch.stack([p.data for p in projs])
    if fmt == "bf16":
        return data
    E, N = data.shape[0], data.shape[1]
    if fmt == "fp8_block":
        return QuantizedTensor(data, torch.stack([p.scales for p in projs]), (1, projs[0].block_rows, FP8_BLOCK), fmt)
    K = data.shape[2] * (2 if fmt == "nvfp4" else 1)
    if fmt == "fp8":  # per-tensor scales; a fused gate/up tensor has 2 (one per half): [E, parts, 1]
        scales = torch.stack([p.scales.reshape(-1) for p in projs]).float()  # [E, parts]
        parts = scales.shape[1]
        return QuantizedTensor(data, scales.reshape(E, parts, 1).contiguous(), (1, N // parts, K), fmt)
    scales = torch.stack([p.scales for p in projs])  # [E, N, K/16] e4m3
    g = torch.stack([p.global_scale.reshape(-1, 1) for p in projs]).float()  # [E, N or 1, 1]
    return QuantizedTensor(data, scales, (1, 1, NVFP4_BLOCK), fmt, g.contiguous())


def _fuse(gate: _Proj, up: _Proj, fmt: str) -> _Proj:
    """gate [I, K] and up [I, K] -> w13 [2I, K], gate rows first, scales carried along."""
    data, I = torch.cat([gate.data, up.data]), gate.data.shape[0]
    if fmt == "bf16":
        return _Proj(data)
    if fmt == "fp8_block":
        if I % FP8_BLOCK == 0:
            return _Proj(data, torch.cat([gate.scales, up.scales]))
        # up's rows start at I, off the 128-row grid: keep the exact scales, one per row
        # ([2I, K/128], block rows 1); the triton preprocessing puts them back on the grid.
        rows = [p.scales.repeat_interleave(FP8_BLOCK, dim=0)[:I] for p in (gate, up)]
        return _Proj(data, torch.cat(rows), block_rows=1)
    if fmt == "fp8":
        return _Proj(data, torch.cat([gate.scales.reshape(1), up.scales.reshape(1)]))
    # nvfp4: gate and up may have different global scales -> one per row
    g = torch.cat([gate.global_scale.reshape(1).expand(I), up.global_scale.reshape(1).expand(I)])
    return _Proj(data, torch.cat([gate.scales, up.scales]), g)


def _expect_fused(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig) -> tuple[str, str]:
    """Check the fused gate_up / down tensors (GPT-OSS layout when swiglu_clamped); return their names."""
    H, I, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    gu, dn = f"{lay.moe}.experts.gate_up_proj", f"{lay.moe}.experts.down_proj"
    gpt_oss = cfg.activation == "swiglu_clamped"
    _expect(files, gu, _FLOAT, (E, H, 2 * I) if gpt_oss else (E, 2 * I, H))
    _expect(files, dn, _FLOAT, (E, I, H) if gpt_oss else (E, H, I))
    return gu, dn


def _shared_base(files: CheckpointFiles, lay: _Layout) -> str | None:
    return next((b for b in (f"{lay.moe}.shared_experts", f"{lay.moe}.shared_expert")
                 if f"{b}.gate_proj.weight" in files), None)


def _shared_projs(cfg: MoEConfig, base: str) -> dict[str, tuple[str, int, int]]:
    S, H = cfg.shared_width, cfg.hidden
    return {"gate_proj": (f"{base}.gate_proj", S, H), "up_proj": (f"{base}.up_proj", S, H),
            "down_proj": (f"{base}.down_proj", H, S)}


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
            _expect_fused(files, lay, cfg)
        else:
            gn, un, dn = _PROJ[lay.scheme]
            for e in range(cfg.num_experts):
                for p, N, K in ((gn, I, H), (un, I, H), (dn, H, I)):
                    _expect_proj(files, f"{lay.moe}.experts.{e}.{p}", lay.format, N, K)
        _load_router(files, lay, cfg)
        if cfg.shared_experts:
            base = _shared_base(files, lay)
            fmt = lay.format if base is None else _weight_format(files, f"{base}.gate_proj")
            for name, N, K in _shared_projs(cfg, base or f"{lay.moe}.shared_experts").values():
                _expect_proj(files, name, fmt, N, K)
        return lay.format
    finally:
        if not isinstance(path, CheckpointFiles):
            files.close()


def load_moe_layer(path: str | Path, cfg: MoEConfig, layer: int, rank: int = 0, world: int = 1,
                   placement: Placement | None = None, runner: str = "auto", dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", check_finite: bool = True,
                   replicas: ReplicaPlan | None = None) -> MoELayerWeights:
    """Read MoE layer `layer` of the checkpoint at `path` for EP rank `rank` of `world`.

    Experts by local index of `placement` (default contiguous), or with `replicas` (a ReplicaPlan) by
    this rank's slots. dtype: cast float weights (default: as stored; quantized checkpoints' shared
    experts fp32). runner: whose `prepare` runs ("auto": `select.pick_runner` for `device`, as
    `MoELayer(runner="auto")`). check_finite: a ValueError naming the expert whose float weights or
    biases hold NaN / inf.
    """
    E = cfg.num_experts
    if replicas is not None:
        if placement is not None:
            raise ValueError("pass placement or replicas, not both")
        if replicas.num_experts != E or replicas.num_ranks != world or not 0 <= rank < world:
            raise ValueError(f"rank {rank} / replica plan of {replicas.num_experts} experts on {replicas.num_ranks} "
                             f"ranks does not fit a layer of {E} experts on {world} ranks")
        placement = replicas.placement()
    elif placement is None:
        if E % world:
            raise ValueError(f"the layer has {E} experts, not divisible by the EP world size {world}; choose a "
                             f"world size that divides {E} or pass a Placement")
        placement = Placement.contiguous(E, world)
    if not 0 <= rank < placement.world or (replicas is None and placement.num_experts != E):
        raise ValueError(f"rank {rank} / placement of {placement.num_experts} experts on {placement.world} ranks "
                         f"does not fit a layer of {E} experts")
    ids = placement.global_ids(rank) if replicas is None else replicas.rank_experts(rank)  # [E_local] int64
    files = CheckpointFiles(path)
    try:
        lay = _find_layout(files, layer)
        _check_expert_count(files, lay, E)
        input_scales: dict[str, torch.Tensor] = {}
        if lay.scheme == "fused":
            experts = _load_fused(files, lay, cfg, ids)
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
    mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
    w = out.experts
    out.experts = get_runner(runner).prepare(ExpertWeights(w.w13.to(device), w.w2.to(device), mv(w.b13), mv(w.b2)), cfg)
    out.gate, out.gate_bias, out.correction_bias = mv(out.gate), mv(out.gate_bias), mv(out.correction_bias)
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


def _load_per_expert(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig,
                     ids: torch.Tensor) -> tuple[ExpertWeights, dict[str, torch.Tensor]]:
    H, I, fmt = cfg.hidden, cfg.intermediate, lay.format
    gn, un, dn = _PROJ[lay.scheme]
    w13, w2, b13, b2 = [], [], [], []
    for e in ids.tolist():
        base = f"{lay.moe}.experts.{e}"
        gate, up = _read_proj(files, f"{base}.{gn}", fmt, I, H), _read_proj(files, f"{base}.{un}", fmt, I, H)
        w13.append(_fuse(gate, up, fmt))
        if gate.input_scale is not None and up.input_scale is not None:
            w13[-1].input_scale = torch.maximum(gate.input_scale, up.input_scale)
        w2.append(_read_proj(files, f"{base}.{dn}", fmt, H, I))
        if cfg.has_bias:
            b13.append(torch.cat([_read_bias(files, f"{base}.{p}.bias", I) for p in (gn, un)]))
            b2.append(_read_bias(files, f"{base}.{dn}.bias", H))
    weights = ExpertWeights(_stack(w13, fmt), _stack(w2, fmt), torch.stack(b13) if b13 else None,
                            torch.stack(b2) if b2 else None)
    scales: dict[str, torch.Tensor] = {}
    if fmt in ("fp8", "nvfp4") and all(p.input_scale is not None for p in w13 + w2):
        scales = {"w13": _fix_input_scales(files, lay, cfg, ids, [p.input_scale for p in w13], (gn, un), "w13"),
                  "w2": _fix_input_scales(files, lay, cfg, ids, [p.input_scale for p in w2], (dn,), "w2")}
    return weights, scales


def _read_bias(files: CheckpointFiles, name: str, n: int) -> torch.Tensor:
    _expect(files, name, _FLOAT, (n,))
    return files.read(name).float()


def _fix_input_scales(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, ids: torch.Tensor,
                      local: list[torch.Tensor], projs: tuple[str, ...], what: str) -> torch.Tensor:
    """[E_local] static input scales; a zero (an expert calibration never reached) would make
    quantization divide by zero: it is replaced by the layer's maximum over all experts, with a warning."""
    s = torch.stack(local).float()  # [E_local]
    zero = (s == 0).nonzero().flatten()
    if zero.numel():
        every = [files.read(f"{lay.moe}.experts.{e}.{p}.input_scale").float().reshape(())
                 for e in range(cfg.num_experts) for p in projs]
        layer_max = torch.stack(every).max()
        if not layer_max > 0:
            raise _fail(files, f"{lay.moe}.experts.0.{projs[0]}.input_scale",
                        f"every {what} input_scale of the layer is zero", "recalibrate the checkpoint")
        warnings.warn(f"{lay.moe}: experts {[int(ids[i]) for i in zero.tolist()]} have a zero {what} input_scale "
                      f"(never calibrated) in {files.origin}; using the layer maximum {float(layer_max):.6g}",
                      stacklevel=4)
        s[zero] = layer_max
    return s


def _load_fused(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, ids: torch.Tensor) -> ExpertWeights:
    """transformers v5 fused [E, ...] tensors; GPT-OSS layout when the activation is swiglu_clamped."""
    gu, dn = _expect_fused(files, lay, cfg)

    def rows(name: str) -> torch.Tensor:
        lo, hi = int(ids.min()), int(ids.max()) + 1
        if torch.equal(ids, torch.arange(lo, hi)):
            return files.read(name, lo, hi)  # contiguous placement: one slice
        return torch.stack([files.read(name, e, e + 1)[0] for e in ids.tolist()])

    if cfg.activation != "swiglu_clamped":
        return ExpertWeights(rows(gu), rows(dn))
    _expect(files, f"{gu}_bias", _FLOAT, (cfg.num_experts, 2 * cfg.intermediate))
    _expect(files, f"{dn}_bias", _FLOAT, (cfg.num_experts, cfg.hidden))
    return gpt_oss_experts(rows(gu), rows(f"{gu}_bias"), rows(dn), rows(f"{dn}_bias"))


def gpt_oss_experts(gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                    down_bias: torch.Tensor) -> ExpertWeights:
    """HF GPT-OSS expert tensors in our layout (used by the loader and by integrations/hf.py).

    HF computes x @ gate_up [H, 2I] with gate = columns 0::2, up = columns 1::2, then act @ down [I, H].
    gate_up [E, H, 2I], gate_up_bias [E, 2I], down [E, I, H], down_bias [E, H] -> w13 [E, 2I, H]
    (gate rows, then up rows), w2 [E, H, I], fp32 b13 [E, 2I], b2 [E, H]; new contiguous weights and b13.
    """
    w13 = gate_up.transpose(1, 2)  # [E, 2I, H] interleaved rows
    w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1).contiguous()  # gate rows | up rows
    b13 = gate_up_bias.float()
    b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1).contiguous()  # [E, 2I]
    return ExpertWeights(w13, down.transpose(1, 2).contiguous(), b13, down_bias.float())


def _load_router(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, out: MoELayerWeights | None = None) -> None:
    """Check the router weight, bias and correction bias; with `out`, read them into it."""
    E, H = cfg.num_experts, cfg.hidden
    gate = _first(files, f"{lay.moe}.gate.weight", f"{lay.moe}.router.weight")
    bias = _first(files, gate[: -len("weight")] + "bias") if gate else None
    corr = _first(files, f"{lay.moe}.gate.e_score_correction_bias", f"{lay.moe}.e_score_correction_bias")
    for name, shape in ((gate, (E, H)), (bias, (E,)), (corr, (E,))):
        if name:
            _expect(files, name, _FLOAT, shape)
    if out is None:
        return
    out.gate = files.read(gate) if gate else None
    out.gate_bias = files.read(bias).float() if bias else None
    if corr:
        out.correction_bias = files.read(corr).float()
        if not bool(torch.isfinite(out.correction_bias).all()):
            raise _fail(files, corr, "contains NaN or inf", "the checkpoint is corrupt")
    elif cfg.uses_correction_bias:
        raise ValueError(f"routing {cfg.routing!r} needs {lay.moe}.gate.e_score_correction_bias, missing from "
                         f"{files.origin}")


def _load_shared(files: CheckpointFiles, lay: _Layout, cfg: MoEConfig, dtype: torch.dtype | None
                 ) -> SharedExperts | None:
    if f"{lay.moe}.shared_expert_gate.weight" in files and cfg.shared_experts:
        raise _fail(files, f"{lay.moe}.shared_expert_gate.weight",
                    "a sigmoid-gated shared expert (Qwen2-MoE) is not supported by SharedExperts")
    base = _shared_base(files, lay)
    if not cfg.shared_experts:
        if base is not None:
            warnings.warn(f"{base} in {files.origin} is ignored: MoEConfig.shared_experts is 0", stacklevel=3)
        return None
    if base is None:
        raise ValueError(f"MoEConfig has {cfg.shared_experts} shared experts but {files.origin} has no "
                         f"{lay.moe}.shared_experts.gate_proj.weight; fix the config or the layer index")
    fmt = _weight_format(files, f"{base}.gate_proj")
    parts = {p: _read_proj(files, name, fmt, N, K) for p, (name, N, K) in _shared_projs(cfg, base).items()}
    deq = {p: v.dequantize(fmt, dtype or (v.data.dtype if fmt == "bf16" else torch.float32)) for p, v in parts.items()}
    return SharedExperts(torch.cat([deq["gate_proj"], deq["up_proj"]]), deq["down_proj"])
