"""Serving-speed helpers: replay a model's forward from CUDA graphs, and greedy decoding with a static KV cache.

A compressed model only serves faster when the host does not hide the GPU's win: a 2:4 sparse matmul carries a
fixed host-side cost per call (cuSPARSELt plan set-up, about 0.45 ms on torch 2.11), and a batch-1 decoding step of
a 4-bit model is over in a fraction of a millisecond, less than eager PyTorch needs to launch its kernels. A CUDA
graph records the kernels once per input signature and replays them with a single launch.

- [`CUDAGraphRunner`] wraps any callable (a model's `forward`): one graph per input signature (shapes, dtypes,
  devices of the tensor arguments and the values of the others), a small cache of graphs, eager fallback where
  capturing is impossible (CPU tensors, gradients enabled, a capture error, a full cache).
- [`capture_cuda_graphs_`] installs a runner as `model.forward`, so `model(...)` and `generate` use it.
- [`StaticCacheDecoder`] decodes greedily with transformers' `StaticCache` (fixed addresses) and replays each
  decoding step from one CUDA graph.

CUDA graphs are captured by hand (`torch.cuda.graph`), not through `torch.compile(mode="reduce-overhead")`: the
same replay without minutes of compilation per model. PyTorch has no model-level graph cache with an eager fallback
(`torch.cuda.make_graphed_callables` captures one fixed signature), hence this module.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from transformers.utils import logging

from .utils.modules import unwrap_model

logger = logging.get_logger(__name__)

BACKENDS = ("cuda", "emulate")
_PLAIN_TYPES = (bool, int, float, str, type(None), torch.dtype, torch.device)


class _CUDABackend:
    """Captures with `torch.cuda.graph`; all graphs of one runner share a memory pool."""

    name = "cuda"

    def __init__(self):
        self.pool = None

    @staticmethod
    def available(tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and torch.cuda.is_available() and all(t.is_cuda for t in tensors)

    def capture(self, fn: Callable[[], Any], warmup: int, builds_positions: bool) -> tuple[Callable[[], None], Any]:
        # Warm-up on a side stream (lazy cuBLAS / cuSPARSELt initialisation must not happen inside the capture).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), _capture_patches(builds_positions):
            output = fn()
        return graph.replay, output


class _EmulatedBackend:
    """CPU stand-in for tests and `--smoke` runs: 'replaying' calls the function again on the static inputs and
    copies its results into the static outputs, so the runner's buffer handling is exercised without a GPU."""

    name = "emulate"

    @staticmethod
    def available(tensors: list[torch.Tensor]) -> bool:
        return True

    def capture(self, fn: Callable[[], Any], warmup: int, builds_positions: bool) -> tuple[Callable[[], None], Any]:
        for _ in range(warmup):
            fn()
        output = fn()

        def replay() -> None:
            fresh = fn()
            for static, new in zip(pytree.tree_leaves(output), pytree.tree_leaves(fresh)):
                if isinstance(static, torch.Tensor):
                    static.copy_(new)

        return replay, output


@contextlib.contextmanager
def _capture_patches(builds_positions: bool) -> Iterator[None]:
    """Keep transformers' fast attention path inside a capture.

    While a stream is capturing, transformers cannot read tensor values, so its check for packed sequences
    (`find_packed_sequence_indices`, run when no attention mask and no cache are given) returns a mask instead of
    None, and SDPA then runs with a materialised causal mask rather than `is_causal=True` (flash attention): the
    same result, 2-4x slower attention. Position ids that the model builds itself (`arange`) are never packed, so
    while capturing we answer None for them; position ids passed in by the caller keep transformers' own check.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None or not builds_positions:
        yield
        return

    def not_packed(position_ids):
        return None

    masking_utils.find_packed_sequence_indices = not_packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _leaf_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, _PLAIN_TYPES):
        return ("value", type(value).__name__, value)
    # Any other object (a KV cache) is part of the signature by identity: the graph keeps reading the tensors it
    # held at capture time.
    return ("object", id(value))


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value.values())
    return False


class _Graph:
    __slots__ = ("static_args", "static_kwargs", "output", "replay", "objects", "replays")

    def __init__(self, static_args, static_kwargs, output, replay, objects):
        self.static_args = static_args
        self.static_kwargs = static_kwargs
        self.output = output
        self.replay = replay
        self.objects = objects  # keeps objects keyed by id alive, so an id is never reused while cached
        self.replays = 0


class CUDAGraphRunner:
    """Call `fn` through CUDA graphs captured per input signature; eager where a graph cannot be used.

    The first call with a new signature (shapes, dtypes and devices of the tensor arguments, values of the plain
    ones, identity of other objects such as a KV cache) runs `warmup` eager passes on a side stream, captures one
    pass into a CUDA graph with static input buffers, and replays it; later calls with that signature copy their
    tensors into the static buffers and replay the graph: one launch instead of hundreds, and library host work
    (such as cuSPARSELt's per-call plan set-up) is paid once at capture. Graphs share one memory pool; at most
    `max_graphs` are kept (later new signatures run eagerly, with a warning).

    Calls run eagerly, with the same result, when: a tensor argument is not on a CUDA device, gradients are enabled
    (inference only: call under `torch.inference_mode()` or `torch.no_grad()`), an argument is a container holding
    tensors, an argument is another object (a KV cache: the warm-up passes would change it) unless
    `allow_objects=True`, the capture failed for that signature (logged once), or the cache is full.

    Inference only, and only for callables whose kernels depend on shapes, not values: no host synchronisation
    (`.item()`, data-dependent shapes) inside. With `allow_objects=True`, objects passed in are part of the signature
    by identity and must keep their tensors at fixed addresses (a `StaticCache`, see [`StaticCacheDecoder`]).
    Returned tensors are copies (`clone_outputs=True`) unless `clone_outputs=False`, in which case they are the
    graph's static outputs and are overwritten by the next call. Objects a captured forward creates and returns (a
    `DynamicCache` when `use_cache` is on) are not copied: pass `use_cache=False` to a graphed prefill.

    Args:
        fn (`Callable`): the callable, e.g. `model.forward` (not `model`, whose `__call__` may already be wrapped).
        max_graphs (`int`, *optional*, defaults to 8): graphs kept; one per distinct input signature.
        warmup (`int`, *optional*, defaults to 2): eager passes before each capture.
        clone_outputs (`bool`, *optional*, defaults to `True`): return copies of the static outputs.
        backend (`str`, *optional*, defaults to `"cuda"`): `"cuda"`, or `"emulate"` (CPU tests: each replay calls
            `fn` again on the static buffers).
        allow_objects (`bool`, *optional*, defaults to `False`): graph calls that pass objects other than tensors
            and plain values, keyed by identity (the caller restores any state the warm-up passes change).

    >>> runner = CUDAGraphRunner(model.forward)  # doctest: +SKIP
    >>> with torch.inference_mode():  # doctest: +SKIP
    ...     logits = runner(input_ids=ids).logits  # first call captures, later calls replay
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        max_graphs: int = 8,
        warmup: int = 2,
        clone_outputs: bool = True,
        backend: str = "cuda",
        allow_objects: bool = False,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs!r} must be an integer >= 1.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} must be an integer >= 0.")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; allowed: {list(BACKENDS)}.")
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.allow_objects = allow_objects
        self.backend = _CUDABackend() if backend == "cuda" else _EmulatedBackend()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.stats = {"captures": 0, "replays": 0, "eager": 0, "failures": 0}
        self._warned: set[str] = set()
        try:
            self._positional_names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            self._positional_names = []

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message)

    def signature(self, args: tuple, kwargs: dict) -> tuple | None:
        """The graph-cache key of a call, or None when the call must run eagerly."""
        values = list(args) + list(kwargs.values())
        if any(_holds_tensors(v) for v in values):
            self._warn_once("containers", "CUDAGraphRunner: an argument is a container holding tensors; eager.")
            return None
        if not self.allow_objects and any(_leaf_key(v)[0] == "object" for v in values):
            self._warn_once(
                "objects",
                "CUDAGraphRunner: an argument is an object (e.g. a KV cache) that warm-up passes would change; "
                "eager. Pass use_cache=False, or use StaticCacheDecoder for decoding.",
            )
            return None
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not self.backend.available(tensors):
            return None
        if torch.is_grad_enabled():
            self._warn_once(
                "grad",
                "CUDAGraphRunner: gradients are enabled, so calls run eagerly; call under torch.inference_mode() "
                "or torch.no_grad() to replay CUDA graphs.",
            )
            return None
        return (
            torch.is_inference_mode_enabled(),
            tuple(_leaf_key(a) for a in args),
            tuple((k, _leaf_key(v)) for k, v in sorted(kwargs.items())),
        )

    def _builds_positions(self, args: tuple, kwargs: dict) -> bool:
        given = set(kwargs) | set(self._positional_names[: len(args)])
        return "position_ids" not in given or kwargs.get("position_ids") is None

    def capture(self, *args, **kwargs) -> bool:
        """Capture a graph for this signature without using its result; returns whether a graph is available.

        The warm-up passes do run (and change any state `fn` changes, such as a KV cache): callers that keep state
        save and restore it around this call (see [`StaticCacheDecoder`]).
        """
        key = self.signature(args, kwargs)
        if key is None or key in self.failed:
            return False
        if key in self.graphs:
            return True
        if len(self.graphs) >= self.max_graphs:
            self._warn_once(
                "full",
                f"CUDAGraphRunner: {self.max_graphs} graphs cached (max_graphs); calls with new input shapes run "
                "eagerly.",
            )
            return False
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        static_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        objects = [v for v in list(args) + list(kwargs.values()) if _leaf_key(v)[0] == "object"]
        try:
            replay, output = self.backend.capture(
                lambda: self.fn(*static_args, **static_kwargs), self.warmup, self._builds_positions(args, kwargs)
            )
        except Exception as err:  # noqa: BLE001 - any capture error means: run this signature eagerly
            self.failed[key] = f"{type(err).__name__}: {err}"
            self.stats["failures"] += 1
            logger.warning(f"CUDAGraphRunner: capture failed, this input signature runs eagerly ({self.failed[key]}).")
            if torch.cuda.is_available():
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
            return False
        self.graphs[key] = _Graph(static_args, static_kwargs, output, replay, objects)
        self.stats["captures"] += 1
        return True

    def __call__(self, *args, **kwargs):
        key = self.signature(args, kwargs)
        if key is not None and key not in self.graphs:
            self.capture(*args, **kwargs)
        graph = self.graphs.get(key) if key is not None else None
        if graph is None:
            self.stats["eager"] += 1
            return self.fn(*args, **kwargs)
        for static, new in zip(graph.static_args, args):
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.copy_(new)
        for name, new in kwargs.items():
            static = graph.static_kwargs[name]
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.copy_(new)
        graph.replay()
        graph.replays += 1
        self.stats["replays"] += 1
        self.graphs.move_to_end(key)
        if self.clone_outputs:
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, graph.output)
        return graph.output

    def reset(self) -> None:
        """Drop every graph (e.g. after the model's weights were replaced)."""
        self.graphs.clear()
        self.failed.clear()
        self.backend = type(self.backend)()


def capture_cuda_graphs_(model: nn.Module, **runner_kwargs) -> CUDAGraphRunner:
    """Route `model(...)` through a [`CUDAGraphRunner`] of its `forward` (in place); returns the runner.

    Calls with a new input signature capture a graph (after `warmup` eager passes), later ones replay it; eager
    where graphs cannot be used (CPU, gradients enabled, see [`CUDAGraphRunner`]). `model.forward = runner.fn`
    (or `del model.forward`) undoes it.

    Args:
        model (`nn.Module`): the model (wrappers such as DDP are removed first).
        **runner_kwargs: `max_graphs`, `warmup`, `clone_outputs`, `backend`, `allow_objects` of
            [`CUDAGraphRunner`].

    >>> runner = capture_cuda_graphs_(model.half().cuda().eval())  # doctest: +SKIP
    >>> with torch.inference_mode():  # doctest: +SKIP
    ...     out = model(input_ids=ids)
    """
    model = unwrap_model(model)
    current = model.__dict__.get("forward")
    if isinstance(current, CUDAGraphRunner):
        return current
    runner = CUDAGraphRunner(model.forward, **runner_kwargs)
    model.forward = runner
    return runner


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is deprecated)."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class StaticCacheDecoder:
    """Greedy decoding with a static KV cache, each decoding step replayed from one CUDA graph.

    The prompt is processed eagerly into a transformers `StaticCache` (its tensors keep fixed addresses); the first
    decoding step captures the model's one-token forward in a CUDA graph (through [`CUDAGraphRunner`]) and every
    later step replays it: at batch 1 a step is bound by reading the weights, and without graphs the kernel launches
    of eager PyTorch would take longer than the GPU work of a 4-bit model. On CPU (or with `cuda_graphs=False`) the
    same steps run eagerly. Tokens equal `model.generate(do_sample=False)` up to kernel rounding.

    Args:
        model (`PreTrainedModel`): a causal LM (eval mode, on its serving device and dtype).
        max_cache_len (`int`): prompt plus generated tokens the cache holds.
        cuda_graphs (`bool`, *optional*, defaults to `True`): replay decoding steps from a CUDA graph where possible.
        backend (`str`, *optional*, defaults to `"cuda"`): the [`CUDAGraphRunner`] backend.

    >>> decoder = StaticCacheDecoder(model, max_cache_len=256)  # doctest: +SKIP
    >>> tokens = decoder.generate(input_ids, max_new_tokens=64)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, max_cache_len: int, *, cuda_graphs: bool = True, backend: str = "cuda"):
        from transformers import StaticCache

        model = unwrap_model(model)
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"StaticCacheDecoder needs a transformers causal LM, got {type(model).__name__}.")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len={max_cache_len!r} must be an integer >= 2.")
        self.model = model
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        # A forward already routed through a CUDAGraphRunner (capture_cuda_graphs_, accelerate_sparse_inference_) is
        # unwrapped: this decoder captures its own graph, with the cache.
        forward = model.__dict__.get("forward")
        self._model_forward = forward.fn if isinstance(forward, CUDAGraphRunner) else model.forward
        self._cache_kwarg = _cache_kwarg(model)
        self.runner = (
            CUDAGraphRunner(self._model_forward, max_graphs=2, backend=backend, allow_objects=True)
            if cuda_graphs
            else None
        )
        self._length = 0

    def _forward(self, input_ids: torch.Tensor, step: bool):
        kwargs = {"input_ids": input_ids, self._cache_kwarg: self.cache, "use_cache": True, "logits_to_keep": 1}
        if step and self.runner is not None:
            return self.runner(**kwargs)
        return self._model_forward(**kwargs)

    def _cache_state(self) -> list[tuple[Any, str, torch.Tensor]]:
        state = []
        for layer in getattr(self.cache, "layers", []):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    state.append((layer, name, value.clone()))
        return state

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt `input_ids` (batch, length); returns the next tokens (batch, 1)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] >= self.max_cache_len:
            raise ValueError(
                f"the prompt has {input_ids.shape[1]} tokens; max_cache_len={self.max_cache_len} leaves no room."
            )
        if self._length:
            self.cache.reset()  # in place: the tensors keep their addresses, captured graphs stay valid
        logits = self._forward(input_ids, step=False).logits
        self._length = input_ids.shape[1]
        return logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """Feed `tokens` (batch, 1) and `steps - 1` greedy successors; returns the `steps` tokens that follow."""
        if self._length == 0:
            raise RuntimeError("call prefill(input_ids) before decode().")
        if self._length + steps > self.max_cache_len:
            raise ValueError(
                f"{self._length} cached + {steps} steps exceed max_cache_len={self.max_cache_len}; build the "
                "decoder with a larger max_cache_len."
            )
        if self.runner is not None:
            kwargs = {"input_ids": tokens, self._cache_kwarg: self.cache, "use_cache": True, "logits_to_keep": 1}
            key = self.runner.signature((), kwargs)
            if key is not None and key not in self.runner.graphs and key not in self.runner.failed:
                # Warm-up passes advance the cache; put it back as it was (garbage written past the current
                # position is masked out and overwritten by the real steps).
                saved = self._cache_state()
                self.runner.capture(**kwargs)
                for layer, name, value in saved:
                    getattr(layer, name).copy_(value)
        out = []
        for _ in range(steps):
            logits = self._forward(tokens, step=True).logits
            tokens = logits[:, -1:].argmax(-1)
            out.append(tokens)
            self._length += 1
        return torch.cat(out, dim=1)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: `input_ids` followed by `max_new_tokens` tokens."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
        first = self.prefill(input_ids)
        rest = self.decode(first, max_new_tokens - 1) if max_new_tokens > 1 else first[:, :0]
        return torch.cat([input_ids, first, rest], dim=1)


def decode_tokens_per_second(
    model: nn.Module,
    *,
    prompt_length: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    cuda_graphs: bool = True,
    vocab_size: int | None = None,
) -> float:
    """Batch-1 greedy decoding speed (generated tokens per second, median of `repeats` runs after one warm-up) of a
    causal LM with [`StaticCacheDecoder`]; the prompt is `prompt_length` random token ids (weights, not text,
    decide the speed)."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_length), generator=g).to(device)
    decoder = StaticCacheDecoder(model, prompt_length + new_tokens + 1, cuda_graphs=cuda_graphs)
    speeds = []
    for i in range(repeats + 1):
        first = decoder.prefill(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.decode(first, new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            speeds.append(new_tokens / (time.perf_counter() - start))
    return sorted(speeds)[len(speeds) // 2]


__all__ = ["CUDAGraphRunner", "StaticCacheDecoder", "capture_cuda_graphs_", "decode_tokens_per_second"]
