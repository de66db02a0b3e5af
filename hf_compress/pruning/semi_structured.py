"""2:4 semi-structured sparse weights for GPU inference (`torch.sparse.to_sparse_semi_structured`), and a path that
keeps their speed-up: a per-layer policy plus CUDA graphs ([`accelerate_sparse_inference_`])."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils.modules import find_linear_modules, is_conv1d, unwrap_model
from ..utils.validation import did_you_mean as _did_you_mean
from .report import nm_compliant
from .scoring import weight_as_out_in

logger = logging.get_logger(__name__)


@torch.no_grad()
def to_semi_structured_sparse_(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Store the 2:4-pruned Linear weights of `model` as `torch.sparse.SparseSemiStructuredTensor` (in place).

    Sparse tensor cores (NVIDIA Ampere or newer) then run these layers' matmuls on the compressed weights. GPT-2
    `Conv1D` layers are replaced by equivalent `nn.Linear` layers first. Inference only (the weights stop being
    trainable). Prune with `PruningConfig(pattern="2:4")` first.

    Args:
        model (`nn.Module`): a model on a CUDA device in float16 or bfloat16.
        target_modules, exclude_modules: as in [`PruningConfig`] (default: Linear layers of the blocks).

    Returns:
        `list[str]`: names of the converted modules.

    Raises:
        RuntimeError: without CUDA, or when a weight is not on a CUDA device.
        ValueError: when a targeted weight is not 2:4 sparse or not float16/bfloat16.

    Example:

    ```python
    >>> model = model.half().cuda()
    >>> prune_(model, PruningConfig(pattern="2:4"))
    >>> to_semi_structured_sparse_(model)
    ```
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured_sparse_ needs a CUDA GPU (sparse tensor cores, compute capability >= 8.0); "
            "none is available. On CPU, keep the pruned dense weights."
        )
    from torch.sparse import to_sparse_semi_structured

    model = unwrap_model(model)
    converted = []
    for name, module in find_linear_modules(model, target_modules, exclude_modules).items():
        weight = weight_as_out_in(module)
        if weight.device.type != "cuda":
            raise RuntimeError(f"{name}: weight is on {weight.device}; move the model to CUDA first.")
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: weight dtype {weight.dtype} is not supported; use float16 or bfloat16.")
        if not nm_compliant(weight, 2, 4):
            raise ValueError(f"{name}: weight is not 2:4 sparse; prune it with PruningConfig(pattern='2:4') first.")
        module = _as_linear_(model, name, module)
        module.weight = nn.Parameter(
            to_sparse_semi_structured(module.weight.detach().contiguous()), requires_grad=False
        )
        converted.append(name)
    return converted


# ----------------------------------------------------------------------------------------------------------------
# 2:4 inference that keeps the speed-up: per-layer policy + CUDA graphs

SPARSE_POLICIES = ("measure", "static", "all")
SPARSE_WEIGHT_FORMATS = ("2:4", "2:4-fp8")
_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# Shapes every 2:4 backend of torch takes (CUTLASS: 32 x 64 for 16-bit weights; cuSPARSELt: 16 x 16; torchao's
# fp8 CUTLASS kernel: 64 x 128 is safe): a layer whose weight is not a multiple stays dense.
_HARD_MULTIPLE = {"2:4": (32, 64), "2:4-fp8": (64, 128)}


@dataclass
class SparseInferenceConfig:
    """How [`accelerate_sparse_inference_`] picks the layers that run on the 2:4 sparse tensor cores.

    Args:
        policy (`str`, *optional*, defaults to `"measure"`):
            `"measure"`: time the dense and the 2:4 matmul of every distinct layer shape on the model's GPU, inside
            CUDA graphs, at each token count of `tokens`, and make a layer sparse only where 2:4 is at least
            `min_speedup` times faster at all of them (a few seconds, once). `"static"`: a rule that needs no GPU
            (also what [`plan_sparse_inference`] can tell on a CPU): sparse when both weight dimensions are
            multiples of 128 and at least `min_features`, and the smallest of `tokens` is at least `min_tokens`.
            `"all"`: every 2:4 layer whose shape the kernels take.
        tokens (`int` or `list[int]`, *optional*, defaults to 2048):
            Rows (batch x sequence tokens) per forward the model will serve, e.g. `2048` for prefill, `[1, 2048]`
            for prefill and batch-1 decoding alike.
        min_speedup (`float`, *optional*, defaults to 1.05): `"measure"`: measured dense / sparse time required.
        min_features (`int`, *optional*, defaults to 1024): `"static"`: smallest weight dimension made sparse.
        min_tokens (`int`, *optional*, defaults to 256): `"static"`: below this many rows every layer stays dense
            (2:4 matmuls lose at small batches).
        weight_format (`str`, *optional*, defaults to `"2:4"`): `"2:4"`: the pruned 16-bit weights compressed for
            torch's semi-structured kernels (cuSPARSELt or CUTLASS); outputs equal the dense pruned model up to
            fp16/bf16 rounding. `"2:4-fp8"`: 2:4 and float8 (e4m3, per-row scales, activations quantized on the
            fly) with torchao's CUTLASS kernel: needs a bfloat16 model on a Hopper (sm90) GPU; outputs carry fp8
            rounding.
        cuda_graphs (`bool`, *optional*, defaults to `True`): route `model(...)` through a [`CUDAGraphRunner`]
            (one graph per input shape), which removes the per-call host cost of the sparse matmuls.
        max_graphs (`int`, *optional*, defaults to 8): graphs the runner keeps.
        target_modules, exclude_modules: as in [`PruningConfig`] (default: the Linear layers of the blocks).
    """

    policy: str = "measure"
    tokens: int | Sequence[int] = 2048
    min_speedup: float = 1.05
    min_features: int = 1024
    min_tokens: int = 256
    weight_format: str = "2:4"
    cuda_graphs: bool = True
    max_graphs: int = 8
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None

    def __post_init__(self):
        if self.policy not in SPARSE_POLICIES:
            raise ValueError(
                f"policy={self.policy!r} is not allowed; allowed: {list(SPARSE_POLICIES)}."
                + _did_you_mean(self.policy, SPARSE_POLICIES)
            )
        if self.weight_format not in SPARSE_WEIGHT_FORMATS:
            raise ValueError(
                f"weight_format={self.weight_format!r} is not allowed; allowed: {list(SPARSE_WEIGHT_FORMATS)}."
                + _did_you_mean(self.weight_format, SPARSE_WEIGHT_FORMATS)
            )
        tokens = [self.tokens] if isinstance(self.tokens, int) else list(self.tokens)
        if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tokens):
            raise ValueError(f"tokens={self.tokens!r} must be a positive integer or a non-empty list of them.")
        self.tokens = tuple(sorted(set(tokens)))
        if not self.min_speedup > 0:
            raise ValueError(f"min_speedup={self.min_speedup!r} must be > 0 (1.0 = sparse when not slower).")
        for name in ("min_features", "min_tokens", "max_graphs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")


@dataclass
class SparseLayerDecision:
    """Whether one Linear layer runs 2:4 sparse, and why.

    Args:
        name (`str`): qualified module name.
        out_features, in_features (`int`): weight shape.
        dtype (`str`): weight dtype.
        sparse (`bool`): converted to the 2:4 format.
        reason (`str`): why (policy rule, measurement, or the constraint that kept it dense).
        dense_ms, sparse_ms (`dict[int, float]`): `"measure"` policy: ms per matmul at each token count.
    """

    name: str
    out_features: int
    in_features: int
    dtype: str
    sparse: bool
    reason: str
    dense_ms: dict[int, float] = field(default_factory=dict)
    sparse_ms: dict[int, float] = field(default_factory=dict)

    @property
    def speedups(self) -> dict[int, float]:
        return {t: self.dense_ms[t] / self.sparse_ms[t] for t in self.dense_ms if self.sparse_ms.get(t)}


@dataclass
class SparseInferencePlan:
    """The per-layer decisions of [`plan_sparse_inference`] / [`accelerate_sparse_inference_`]."""

    layers: list[SparseLayerDecision]
    config: SparseInferenceConfig

    @property
    def sparse_modules(self) -> list[str]:
        return [d.name for d in self.layers if d.sparse]

    @property
    def dense_modules(self) -> list[str]:
        return [d.name for d in self.layers if not d.sparse]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {k: v for k, v in asdict(self.config).items()},
            "layers": [{**asdict(d), "speedups": d.speedups} for d in self.layers],
        }

    def to_markdown(self) -> str:
        """One row per distinct (shape, decision): how many layers, and why."""
        groups: dict[tuple, list[SparseLayerDecision]] = {}
        for d in self.layers:
            groups.setdefault((d.out_features, d.in_features, d.sparse, d.reason), []).append(d)
        lines = ["| weight (out x in) | layers | 2:4 sparse | reason |", "|---|---:|---|---|"]
        for (out_f, in_f, sparse, reason), members in groups.items():
            lines.append(f"| {out_f} x {in_f} | {len(members)} | {'yes' if sparse else 'no'} | {reason} |")
        return "\n".join(lines)


def _static_rule(out_f: int, in_f: int, config: SparseInferenceConfig) -> tuple[bool, str]:
    if min(config.tokens) < config.min_tokens:
        return False, f"static: {min(config.tokens)} tokens < min_tokens={config.min_tokens} (2:4 loses there)"
    if out_f % 128 or in_f % 128:
        return False, "static: a dimension is not a multiple of 128"
    if min(out_f, in_f) < config.min_features:
        return False, f"static: smaller dimension {min(out_f, in_f)} < min_features={config.min_features}"
    return True, "static: large, aligned weight and enough tokens"


def _fp8_sparse_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), packing_format="sparse_2d_data_2d_metadata", set_inductor_config=False
    )


def _flatten_leading_dims_(linear: nn.Module) -> None:
    """Make `linear` take (..., in) inputs through 2-D calls: torchao's fp8 2:4 CUTLASS kernel checks that the
    activation scale is 2-D and fails on the (batch, seq, in) inputs of a transformer (measured on an H200)."""

    def flatten(module, args):
        x = args[0]
        module._hf_compress_leading_shape = x.shape[:-1]
        return (x.reshape(-1, x.shape[-1]),) + tuple(args[1:])

    def unflatten(module, args, output):
        return output.reshape(*module._hf_compress_leading_shape, output.shape[-1])

    linear.register_forward_pre_hook(flatten)
    linear.register_forward_hook(unflatten)


def _sparse_linear_like(weight: torch.Tensor, weight_format: str) -> nn.Linear:
    """An `nn.Linear` holding `weight` (out, in) in the 2:4 format: what a converted layer computes."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    if weight_format == "2:4":
        from torch.sparse import to_sparse_semi_structured

        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach().contiguous()), False)
    else:
        from torchao.quantization import quantize_

        quantize_(linear, _fp8_sparse_config())
    return linear


def _graph_time_ms(fn, replays: int = 20) -> float:
    """GPU ms per call of `fn`, replayed from a CUDA graph (host overhead excluded, as under CUDAGraphRunner)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _measure_shape(weight: torch.Tensor, config: SparseInferenceConfig) -> tuple[dict, dict]:
    with torch.no_grad():  # built outside inference mode, as accelerate_sparse_inference_ builds the real layers
        sparse = _sparse_linear_like(weight, config.weight_format)
    dense_ms, sparse_ms = {}, {}
    with torch.inference_mode():
        for tokens in config.tokens:
            x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
            dense_ms[tokens] = _graph_time_ms(lambda x=x: torch.nn.functional.linear(x, weight))
            sparse_ms[tokens] = _graph_time_ms(lambda x=x: sparse(x))
    return dense_ms, sparse_ms


def _require_cuda_layers(modules: dict[str, nn.Module]) -> None:
    devices = {weight_as_out_in(m).device.type for m in modules.values()}
    if devices != {"cuda"} or not torch.cuda.is_available():
        raise RuntimeError(
            f"policy='measure' times the matmuls on a CUDA GPU, but the layers are on {sorted(devices)}. Move the "
            "model to CUDA, or use policy='static' (a rule that needs no GPU)."
        )


@torch.no_grad()
def plan_sparse_inference(model: nn.Module, config: SparseInferenceConfig | None = None) -> SparseInferencePlan:
    """Decide, layer by layer, which 2:4-pruned Linear layers would run faster sparse (changes nothing).

    Layers stay dense when their weight is not 2:4 sparse, not float16/bfloat16 (bfloat16 for `"2:4-fp8"`), or
    not a shape the kernels take; then the config's policy decides (see [`SparseInferenceConfig`]). The
    `"static"` and `"all"` policies run anywhere (a CPU included); `"measure"` times the matmuls on the model's
    CUDA device.

    Args:
        model (`nn.Module`): a 2:4-pruned model (see [`prune_`] with `PruningConfig(pattern="2:4")`).
        config ([`SparseInferenceConfig`], *optional*): defaults to `SparseInferenceConfig()`.

    Returns:
        [`SparseInferencePlan`]

    Raises:
        ValueError: when no targeted layer is 2:4 sparse (prune first).
        RuntimeError: `policy="measure"` on a model that is not on a CUDA device.
    """
    config = config or SparseInferenceConfig()
    if not isinstance(config, SparseInferenceConfig):
        raise TypeError(f"config must be a SparseInferenceConfig, got {type(config).__name__}.")
    model = unwrap_model(model)
    modules = find_linear_modules(model, config.target_modules, config.exclude_modules)
    if config.policy == "measure":
        _require_cuda_layers(modules)
    row_multiple, col_multiple = _HARD_MULTIPLE[config.weight_format]
    allowed_dtypes = (torch.bfloat16,) if config.weight_format == "2:4-fp8" else _SPARSE_DTYPES
    measured: dict[tuple, tuple[dict, dict]] = {}
    layers = []
    for name, module in modules.items():
        weight = weight_as_out_in(module)
        out_f, in_f = weight.shape
        decision = SparseLayerDecision(name, out_f, in_f, str(weight.dtype).removeprefix("torch."), False, "")
        layers.append(decision)
        if not nm_compliant(weight, 2, 4):
            decision.reason = "weight is not 2:4 sparse"
        elif weight.dtype not in allowed_dtypes:
            decision.reason = f"dtype {decision.dtype}: {config.weight_format} kernels take " + "/".join(
                str(d).removeprefix("torch.") for d in allowed_dtypes
            )
        elif out_f % row_multiple or in_f % col_multiple:
            decision.reason = f"shape not a multiple of ({row_multiple}, {col_multiple}) that the kernels need"
        elif config.policy == "all":
            decision.sparse, decision.reason = True, "policy=all"
        elif config.policy == "static":
            decision.sparse, decision.reason = _static_rule(out_f, in_f, config)
        else:
            key = (out_f, in_f, weight.dtype)
            if key not in measured:
                try:
                    measured[key] = _measure_shape(weight, config)
                except Exception as err:  # noqa: BLE001 - a kernel that fails here is not used: the layer stays dense
                    measured[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            if isinstance(measured[key], str):
                decision.reason = f"could not measure the 2:4 matmul ({measured[key]})"
                continue
            decision.dense_ms, decision.sparse_ms = (dict(d) for d in measured[key])
            speedups = decision.speedups
            worst = min(speedups.values())
            decision.sparse = worst >= config.min_speedup
            shown = ", ".join(f"{s:.2f}x at {t}" for t, s in speedups.items())
            decision.reason = f"measured {shown} ({'>=' if decision.sparse else '<'} min_speedup)"
    if not any(nm_compliant(weight_as_out_in(m), 2, 4) for m in modules.values()):
        raise ValueError(
            f"none of the {len(modules)} targeted Linear layers is 2:4 sparse; prune with "
            "prune_(model, PruningConfig(pattern='2:4')) first."
        )
    plan = SparseInferencePlan(layers, config)
    kept = [d for d in layers if not d.sparse]
    if kept:
        reasons: dict[str, list[str]] = {}
        for d in kept:
            reasons.setdefault(d.reason, []).append(d.name)
        summary = "; ".join(f"{len(v)} x {r} (e.g. {v[0]})" for r, v in reasons.items())
        logger.warning(f"2:4 inference: {len(kept)} of {len(layers)} layers kept dense: {summary}.")
    return plan


def _as_linear_(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace a GPT-2 Conv1D by the equivalent nn.Linear (the 2:4 formats wrap nn.Linear weights)."""
    if not is_conv1d(module):
        return module
    weight = weight_as_out_in(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    linear = linear.to(device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return linear


@torch.no_grad()
def accelerate_sparse_inference_(model: nn.Module, config: SparseInferenceConfig | None = None) -> SparseInferencePlan:
    """Make a 2:4-pruned model serve faster than its dense self: sparse layers where they win, CUDA graphs around.

    1. [`plan_sparse_inference`] decides per layer (by default it measures dense vs 2:4 at `config.tokens` rows
       on this GPU) and logs the layers kept dense and why.
    2. The chosen layers' weights are compressed in place (`torch.sparse.to_sparse_semi_structured`, or torchao's
       fp8 2:4 format for `weight_format="2:4-fp8"`).
    3. With `cuda_graphs=True`, `model(...)` goes through a [`CUDAGraphRunner`] (one CUDA graph per input shape,
       eager fallback): each semi-structured matmul otherwise pays a fixed host cost (about 0.45 ms with torch 2.11
       and cuSPARSELt 0.8) that makes an eager 2:4 model 1.6-8x *slower* than dense. Call the model under
       `torch.inference_mode()`, with `use_cache=False` for a graphed prefill.

    Outputs equal the dense pruned model's within fp16/bf16 rounding (`"2:4"`). Inference only.

    Args:
        model (`nn.Module`): a 2:4-pruned model on a CUDA GPU (compute capability >= 8.0) in float16/bfloat16.
        config ([`SparseInferenceConfig`], *optional*): defaults to `SparseInferenceConfig()` (measured policy,
            2,048-token forwards, CUDA graphs on).

    Returns:
        [`SparseInferencePlan`]: the decision and reason for every targeted layer.

    Raises:
        RuntimeError: without CUDA, or when the model is not on a CUDA device (see [`plan_sparse_inference`] with
            `policy="static"` for a dry run on CPU).
        ValueError: when no targeted layer is 2:4 sparse.

    Example:

    ```python
    >>> model = model.half().cuda().eval()
    >>> prune_(model, PruningConfig(pattern="2:4"))
    >>> plan = accelerate_sparse_inference_(model, SparseInferenceConfig(tokens=[2048]))
    >>> print(plan.to_markdown())
    >>> with torch.inference_mode():
    ...     logits = model(input_ids=ids, use_cache=False).logits
    ```
    """
    config = config or SparseInferenceConfig()
    if not isinstance(config, SparseInferenceConfig):
        raise TypeError(f"config must be a SparseInferenceConfig, got {type(config).__name__}.")
    model = unwrap_model(model)
    if not torch.cuda.is_available():
        raise RuntimeError(
            "accelerate_sparse_inference_ needs a CUDA GPU (sparse tensor cores, compute capability >= 8.0); none "
            "is available. On CPU keep the pruned dense weights; plan_sparse_inference(model, "
            "SparseInferenceConfig(policy='static')) shows which layers would be made sparse."
        )
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cuda"}:
        raise RuntimeError(f"the model's parameters are on {sorted(devices)}; move the model to CUDA first.")
    plan = plan_sparse_inference(model, config)
    modules = find_linear_modules(model, config.target_modules, config.exclude_modules)
    chosen = set(plan.sparse_modules)
    linears = {name: _as_linear_(model, name, modules[name]) for name in plan.sparse_modules}
    if config.weight_format == "2:4":
        from torch.sparse import to_sparse_semi_structured

        for linear in linears.values():
            linear.weight = nn.Parameter(
                to_sparse_semi_structured(linear.weight.detach().contiguous()), requires_grad=False
            )
    elif linears:
        from torchao.quantization import quantize_

        quantize_(model, _fp8_sparse_config(), filter_fn=lambda module, fqn: fqn in chosen)
        for linear in linears.values():
            _flatten_leading_dims_(linear)
    if config.cuda_graphs:
        from ..inference import capture_cuda_graphs_

        capture_cuda_graphs_(model, max_graphs=config.max_graphs)
    logger.info(f"2:4 inference: {len(chosen)} of {len(plan.layers)} layers sparse ({config.weight_format}).")
    return plan
