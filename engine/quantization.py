"""Weight quantization as a module swap: quantized variants of the parallel linear layers.

``column_parallel`` and ``row_parallel`` build the layers the model asks for: the plain ones
(engine/parallel.py), or, under a ``QuantScheme`` (pdserve/quant_config.py), ones that hold
int8 or fp8 e4m3 weights ``[N, K]`` with float32 scales ``[N, G]``: one per output row and
group of ``group_size`` inputs (per channel and per tensor: G = 1; per block: a block's scale
repeated over its rows, so row shards and fused q/k/v need no block alignment).

Loading: a full-precision tensor is quantized on load (per row over the whole row, before a
row-parallel layer takes its columns, so every tensor-parallel size holds the same numbers);
a published one is copied as is with its scales, which tensor parallelism shards with their
rows or columns.

Compute, by device:
- CPU (engine/cpu_kernels/small_gemm.cpp): up to 8 rows (decode) the kernel reads the
  quantized bytes and widens them in registers, so a step moves one byte per weight; up to
  ``TILED_ROWS`` it dequantizes a tile of weight rows into cache and runs its float32 kernel
  over it; beyond, the weight is dequantized into a scratch buffer and the dense GEMM runs
  (it measured faster from about 16 rows: MKL's register blocking beats the tile loop).
  fp8 activations (``dynamic`` or ``static``) are rounded to e4m3 and back per token, exactly
  as transformers' compressed-tensors path does: torch has no fast fp8 matmul on a CPU
  (``torch._scaled_mm`` there measured 50-150x slower than bf16 F.linear).
- CUDA: fp8 per channel or tensor with fp8 activations runs ``torch._scaled_mm`` (W8A8,
  scales per token and per channel); everything else dequantizes into the scratch buffer and
  runs F.linear (int8 saves memory there, not time).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from engine.cpu_kernels import library_or_none
from engine.linear import linear
from engine.parallel import ColumnParallelLinear, RowParallelLinear, TensorParallel
from pdserve.quant_config import QuantScheme

INT8_MAX = 127.0
FP8_MAX = 448.0
TILED_ROWS = 16  # CPU: rows the quantized kernel takes; beyond, dequantize + dense GEMM
_EPS = torch.finfo(torch.float32).eps
_Q_TYPES = {torch.int8: 0, torch.float8_e4m3fn: 1}
_X_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def quantize_rows(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``weight [N, K]``: (values, float32 scales [N, 1]),
    scale = the row's largest magnitude over 127 (int8) or 448 (fp8)."""
    w = weight.float()
    limit = INT8_MAX if kind == "int8" else FP8_MAX
    scale = (w.abs().amax(dim=1, keepdim=True) / limit).clamp(min=_EPS)
    scaled = (w / scale).clamp(-limit, limit)
    values = scaled.round().to(torch.int8) if kind == "int8" else scaled.to(torch.float8_e4m3fn)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``values [N, K] * scale [N, ceil(K / group_size)]`` (each scale over its group)."""
    columns = values.shape[1]
    expanded = scale.repeat_interleave(group_size, dim=1)[:, :columns]
    return (values.float() * expanded).to(dtype)


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-token fp8 scales from each row's largest magnitude ``[M, 1]`` (in x's dtype, as
    compressed-tensors computes them; 0 becomes the dtype's eps)."""
    scale = amax / FP8_MAX
    return torch.where(scale == 0, torch.finfo(amax.dtype).eps, scale)


def fp8_round_rows_torch(x: torch.Tensor,
                         scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Each row of ``x`` quantized to e4m3 and back, in x's dtype as compressed-tensors
    computes it. ``scale``: None (each row's largest magnitude / 448), one static value, or
    a scale per row ``[M, 1]``."""
    if scale is None:
        scale = row_scales(x.abs().amax(dim=-1, keepdim=True))
    else:
        scale = torch.as_tensor(scale, device=x.device).to(x.dtype)
    rounded = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return rounded.to(x.dtype) * scale


def fp8_round_rows(x: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_round_rows_torch`` in one pass on the CPU where the kernels build."""
    library = library_or_none() if x.device.type == "cpu" else None
    if library is None or x.dtype not in _X_TYPES or x.dim() != 2:
        return fp8_round_rows_torch(x, scale)
    x = x.contiguous()
    out = torch.empty_like(x)
    scales = None if scale is None else torch.as_tensor(scale).float().reshape(-1).contiguous()
    library.pdserve_fp8_quant_dequant(
        _X_TYPES[x.dtype], x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
        None if scales is None else scales.data_ptr(),
        0 if scales is None or scales.numel() == 1 else 1)
    return out


_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch_weight(rows: int, columns: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """One reused buffer per device and dtype, as large as the largest layer seen: a forward
    pass runs its layers one after another, so they can share it."""
    key = (device, dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = torch.empty(rows * columns, dtype=dtype, device=device)
        _scratch[key] = buffer
    return buffer[: rows * columns].view(rows, columns)


def dequantize_into_scratch(values: torch.Tensor, scale: torch.Tensor, group_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    rows, columns = values.shape
    library = library_or_none() if values.device.type == "cpu" else None
    if library is None or dtype not in _X_TYPES:
        return dequantize(values, scale, group_size, dtype)  # CUDA: its caching allocator
    out = _scratch_weight(rows, columns, dtype, values.device)
    library.pdserve_dequantize(_Q_TYPES[values.dtype], _X_TYPES[dtype], values.data_ptr(),
                               scale.data_ptr(), group_size, out.data_ptr(), rows, columns,
                               torch.get_num_threads())
    return out


def quantized_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """``x [M, K] @ dequantize(values, scale)^T`` -> ``[M, N]`` in x's dtype."""
    rows = x.shape[0]
    if (x.device.type == "cpu" and x.dim() == 2 and 0 < rows <= TILED_ROWS
            and x.dtype in _X_TYPES):
        library = library_or_none()
        if library is not None:
            x = x.contiguous()
            out = torch.empty(rows, values.shape[0], dtype=x.dtype)
            library.pdserve_quant_gemm(_Q_TYPES[values.dtype], _X_TYPES[x.dtype], x.data_ptr(),
                                       values.data_ptr(), scale.data_ptr(), group_size,
                                       out.data_ptr(), rows, values.shape[0], values.shape[1],
                                       torch.get_num_threads())
            return out
    return linear(x, dequantize_into_scratch(values, scale, group_size, x.dtype))


def scaled_mm_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                     x_scale: float | torch.Tensor | None) -> torch.Tensor:
    """W8A8 through ``torch._scaled_mm``: x quantized to fp8 per token (``x_scale`` None: its
    rows' own, else a static value or a scale per row), fp8 weights with a scale per output
    row (``scale [N, 1]``)."""
    if x_scale is None:
        x_scale = row_scales(x.abs().amax(dim=-1, keepdim=True))
    x_scale = torch.as_tensor(x_scale, device=x.device).to(x.dtype).float().expand(
        x.shape[0], 1).contiguous()
    x_fp8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(x_fp8, values.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
                            out_dtype=x.dtype)


class QuantizedLinear(nn.Module):
    """Quantized weights of one column- or row-parallel layer and the forward over them.

    ``shards`` maps each checkpoint tensor the layer fuses to (first row in the checkpoint,
    rows, row offset here); ``columns`` is (first input column in the checkpoint, count).
    """

    def __init__(self, scheme: QuantScheme, shards: dict[str | None, tuple[int, int, int]],
                 columns: tuple[int, int], full_columns: int, bias: bool, dtype: torch.dtype,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.scheme = scheme
        self.shards = shards
        self.first_column, local_columns = columns
        self.full_columns = full_columns
        self.tp = tp  # set on row-parallel layers: the output is all-reduced
        rows = sum(count for _, count, _ in shards.values())
        self.group_size = scheme.block[1] if scheme.block else full_columns
        if scheme.block and self.first_column % self.group_size:
            raise ValueError(f"a {full_columns}-input row-parallel layer split into "
                             f"{local_columns}-column shards does not align with the fp8 "
                             f"block of {self.group_size} columns: use another "
                             f"tensor_parallel_size")
        groups = math.ceil(local_columns / self.group_size)
        self.register_buffer("weight", torch.zeros(rows, local_columns,
                                                   dtype=_STORAGE[scheme.weights]))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=torch.float32))
        self.bias = (nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.input_scales: dict[str | None, float] = {}
        self._loaded: set[tuple[str | None, str]] = set()
        self.fast_path = "none"  # "scaled_mm" | "int8pack": set on CUDA by enable_fast_paths

    # -- loading ---------------------------------------------------------------------------

    def load(self, shard: str | None, param: str, full: torch.Tensor) -> bool:
        """Copy one checkpoint tensor's part; False if ``param`` is not one this layer has."""
        first, rows, offset = self.shards[shard]
        if param == "bias" and self.bias is not None:
            self.bias[offset : offset + rows].copy_(full[first : first + rows])
        elif param == "weight":
            self._load_weight(shard, full, first, rows, offset)
        elif param == self.scheme.scale_name and self.scheme.prequantized:
            self._load_scale(shard, full, first, rows, offset)
        elif param == "input_scale" and self.scheme.activations == "static":
            if full.numel() != 1:
                raise ValueError(f"input_scale has shape {list(full.shape)}: must be one value")
            self.input_scales[shard] = float(full.float().reshape(()))
        else:
            return False
        self._loaded.add((shard, param))
        return True

    def _columns(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, self.first_column : self.first_column + self.weight.shape[1]]

    def _load_weight(self, shard: str | None, full: torch.Tensor, first: int, rows: int,
                     offset: int) -> None:
        if full.dim() != 2 or full.shape[1] != self.full_columns:
            raise ValueError(f"weight has shape {list(full.shape)}: expected [rows, "
                             f"{self.full_columns}]")
        part = full[first : first + rows]
        if not self.scheme.prequantized:
            values, scale = quantize_rows(part, self.scheme.weights)
            self.weight[offset : offset + rows].copy_(self._columns(values))
            self.scale[offset : offset + rows].copy_(scale)
            self._loaded.add((shard, "scale"))
            return
        if full.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight is {full.dtype}: a {self.scheme.source} checkpoint "
                             f"holds float8_e4m3fn weights")
        self.weight[offset : offset + rows].copy_(self._columns(part))

    def _load_scale(self, shard: str | None, full: torch.Tensor, first: int, rows: int,
                    offset: int) -> None:
        name, scheme = self.scheme.scale_name, self.scheme
        full = full.float()
        if scheme.strategy == "tensor":
            if full.numel() != 1:
                raise ValueError(f"{name} has shape {list(full.shape)}: a per-tensor scale "
                                 f"is one value")
            self.scale[offset : offset + rows].fill_(float(full.reshape(())))
        elif scheme.strategy == "channel":
            if full.dim() not in (1, 2) or full.shape[0] < first + rows or full.numel() != \
                    full.shape[0]:
                raise ValueError(f"{name} has shape {list(full.shape)}: a per-channel scale "
                                 f"is [rows] or [rows, 1] covering rows {first}..."
                                 f"{first + rows - 1}")
            self.scale[offset : offset + rows, 0].copy_(full.reshape(-1)[first : first + rows])
        else:
            block_rows, block_columns = scheme.block
            row_blocks = -(-(first + rows) // block_rows)
            expected_columns = -(-self.full_columns // block_columns)
            if (full.dim() != 2 or full.shape[0] < row_blocks
                    or full.shape[1] != expected_columns):
                raise ValueError(f"{name} has shape {list(full.shape)}: blocks of "
                                 f"{block_rows}x{block_columns} over {self.full_columns} "
                                 f"inputs need [>= {row_blocks}, {expected_columns}]")
            row_index = torch.arange(first, first + rows) // block_rows
            group = self.first_column // block_columns
            self.scale[offset : offset + rows].copy_(
                full[row_index, group : group + self.scale.shape[1]])

    def missing(self, shard: str | None) -> list[str]:
        """Checkpoint parameters this shard still lacks once every tensor has been read."""
        needed = ["weight"]
        if self.scheme.prequantized:
            needed.append(self.scheme.scale_name)
        if self.scheme.activations == "static":
            needed.append("input_scale")
        return [param for param in needed if (shard, param) not in self._loaded]

    # -- compute ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = set(self.input_scales.values())
        if self.scheme.activations == "static" and len(scales) > 1:
            # Fused shards with different static scales: each shard sees x rounded its way.
            out = torch.cat([self._matmul(x, self.input_scales[shard], offset, offset + rows)
                             for shard, (_, rows, offset) in self.shards.items()], dim=-1)
        else:
            x_scale = scales.pop() if scales else None
            if (self.scheme.activations == "dynamic" and self.tp is not None
                    and self.tp.size > 1):
                # A row-parallel rank sees part of each token: the token's scale comes from
                # its whole row, so every tensor-parallel size rounds the same way.
                amax = x.abs().amax(dim=-1, keepdim=True)
                dist.all_reduce(amax, op=dist.ReduceOp.MAX)
                x_scale = row_scales(amax)
            out = self._matmul(x, x_scale, 0, self.weight.shape[0])
        if self.bias is not None:
            out = out + self.bias
        return out if self.tp is None else self.tp.all_reduce(out)

    def _matmul(self, x: torch.Tensor, x_scale: float | torch.Tensor | None, begin: int,
                end: int) -> torch.Tensor:
        values, scale = self.weight[begin:end], self.scale[begin:end]
        if self.scheme.activations != "none":
            if self.fast_path == "scaled_mm":
                return scaled_mm_linear(x, values, scale, x_scale)
            x = fp8_round_rows(x, x_scale)
        elif self.fast_path == "int8pack":
            return torch._weight_int8pack_mm(x, values, scale.view(-1).to(x.dtype))
        return quantized_linear(x, values, scale, self.group_size)


def column_parallel(in_features: int, shards: dict[str, tuple[int, int]], bias: bool,
                    dtype: torch.dtype, scheme: QuantScheme | None) -> nn.Module:
    """A column-parallel layer (rows split, shards fused), quantized under ``scheme``."""
    if scheme is None:
        return ColumnParallelLinear(in_features, shards, bias, dtype)
    placed, offset = {}, 0
    for name, (first, rows) in shards.items():
        placed[name] = (first, rows, offset)
        offset += rows
    return QuantizedLinear(scheme, placed, (0, in_features), in_features, bias, dtype)


def row_parallel(in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype,
                 scheme: QuantScheme | None) -> nn.Module:
    """A row-parallel layer (input columns split, output all-reduced), quantized under
    ``scheme``."""
    if scheme is None:
        return RowParallelLinear(in_features, out_features, tp, dtype)
    if in_features % tp.size:
        raise ValueError(f"in_features={in_features} not divisible by tp size {tp.size}")
    local = in_features // tp.size
    return QuantizedLinear(scheme, {None: (0, out_features, 0)}, (tp.rank * local, local),
                           in_features, False, dtype, tp)


def enable_fast_paths(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """On CUDA, let fp8 layers with fp8 activations and one scale per row run
    ``torch._scaled_mm``, and int8 layers ``torch._weight_int8pack_mm``, where one layer's
    trial call succeeds; returns the compute path for the start-up log."""
    if device.type != "cuda":
        return "pdserve CPU kernels" if device.type == "cpu" else "dequantize + GEMM"
    paths = set()
    for module in model.modules():
        if not isinstance(module, QuantizedLinear):
            continue
        scheme, (rows, columns) = module.scheme, module.weight.shape
        if (scheme.weights == "fp8" and scheme.activations != "none" and scheme.block is None
                and dtype == torch.bfloat16 and rows % 16 == 0 and columns % 16 == 0):
            module.fast_path = "scaled_mm"
        elif scheme.weights == "int8" and dtype in (torch.bfloat16, torch.float16):
            module.fast_path = "int8pack"
        if module.fast_path != "none":
            try:  # a kernel this torch build or GPU lacks fails here, not mid-request
                module(torch.zeros(1, columns, dtype=dtype, device=device))
            except (RuntimeError, NotImplementedError):
                module.fast_path = "none"
        paths.add(module.fast_path)
    names = {"scaled_mm": "torch._scaled_mm (W8A8)", "int8pack": "torch._weight_int8pack_mm",
             "none": "dequantize + GEMM"}
    return ", ".join(sorted(names[path] for path in paths))
