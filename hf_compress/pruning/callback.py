"""`PruningCallback`: gradual unstructured / N:M pruning inside any `transformers.Trainer` run."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.trainer_callback import ExportableState, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..utils.checkpoints import CorruptCheckpointError, resumed_checkpoint_folder
from ..utils.modules import unwrap_model
from ..utils.reliability import (
    bounded_collectives,
    check_finite_weights,
    check_ranks_alive,
    ensure_callback_state_slot,
    honour_ddp_timeout,
    saved_callback_state,
)
from ..utils.sharding import full_tensor, logical_numel, mul_
from ..utils.validation import InvalidArgumentTypeError, check_writable_folder
from .checkpoint import MASKS_NAME, load_verified_masks, save_masks
from .config import PruningConfig
from .schedule import is_pruning_step, last_pruning_step_at_or_before, schedule_shortfall, sparsity_at_step
from .scoring import get_scorer_class
from .unstructured import (
    _full_mask,
    _is_dtensor,
    _shard_like,
    apply_masks_,
    compute_masks,
    get_pruning_targets,
    make_pruning_permanent_,
    num_kept,
)

logger = logging.get_logger(__name__)

# Calibration batches cannot go into trainer_state.json; when the Trainer re-creates this callback from a checkpoint
# (`restore_callback_states_from_checkpoint=True`) the new instance finds them on the instance it replaces, through
# its `calibration_key`. Weak references only: the batches live as long as a callback holding them, not as long as
# the process.
_LIVE_CALLBACKS: weakref.WeakValueDictionary[str, PruningCallback] = weakref.WeakValueDictionary()


def _broadcast_masks(
    masks: dict[str, torch.Tensor], timeout_s: float | None = None, what: str = "PruningCallback"
) -> dict[str, torch.Tensor]:
    """Under torch.distributed, make every rank use rank 0's masks (scores can differ by float noise or by
    rank-local calibration batches; masks must not). DTensor masks (FSDP2) and flat ZeRO-3 partitions (1-D; whole
    masks of Linear weights are 2-D) are left as they are: `compute_masks` already took them from rank 0's whole
    mask. A stalled rank makes this fail within `timeout_s` (the run's `ddp_timeout`) with a `TimeoutError`,
    instead of blocking the others."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return masks
    if torch.distributed.get_world_size() == 1:
        return masks
    what = f"{what}: broadcasting the pruning masks"
    check_ranks_alive(timeout_s, what)
    out = {}
    with bounded_collectives(timeout_s, what):
        for name in sorted(masks):
            if _is_dtensor(masks[name]) or masks[name].dim() == 1:
                out[name] = masks[name]
                continue
            buffer = masks[name].to(torch.uint8)  # gloo has no bool collectives
            torch.distributed.broadcast(buffer, src=0)
            out[name] = buffer.bool()
    return {name: out[name] for name in masks}


def _check_calibration_data(calibration_data) -> None:
    """Batches are iterated at every pruning step: a single dict (its keys would be iterated) or a string is a
    mistake found only then, possibly after hours of training."""
    if calibration_data is None:
        return
    if isinstance(calibration_data, (str, bytes, Mapping, torch.Tensor)) or not isinstance(calibration_data, Iterable):
        raise InvalidArgumentTypeError(
            f"calibration_data must be an iterable of batches (a list of dicts of tensors, or a DataLoader), got "
            f"{type(calibration_data).__name__}; wrap a single batch in a list."
        )


class PruningCallback(TrainerCallback, ExportableState):
    """Prunes the model on a schedule during `Trainer.train()` and keeps pruned weights at exactly zero.

    - Masks are recomputed at the schedule's steps (`TrainerState.global_step`, i.e. optimizer updates, so gradient
      accumulation does not change the schedule) and re-applied after every optimizer step, so Adam momentum cannot
      revive a pruned weight. Under DDP the masks of rank 0 are broadcast to every rank; under FSDP2
      (DTensor weights) masks are chosen on the whole weights and kept sharded like them.
    - Logs `sparsity_targeted` (fraction of zeros among the targeted weights: what pruning achieved),
      `sparsity_scheduled` (the schedule's target at this step), `sparsity_layer_min` and `sparsity_layer_max` with
      the training logs. Whole-model sparsity (embeddings, heads and norms included) is
      [`CompressionReportCallback`]'s `eval_sparsity_model`.
    - Checkpoints get a `pruning_masks.safetensors` and the schedule position (via `ExportableState`), and
      `resume_from_checkpoint` continues with the same masks as an uninterrupted run.
    - At the end of training the masks are baked into the weights: `trainer.save_model()` writes a plain
      transformers checkpoint whose zeros `from_pretrained` loads back.
    - With a PEFT model the base layers are pruned (never `lora_A` / `lora_B`); merge with
      [`merge_lora_keep_sparsity`] so the dense LoRA delta does not fill the pruned positions.

    Args:
        config ([`PruningConfig`] or `dict`): what, how much and when to prune.
        calibration_data (*optional*): batches for `method="wanda"` (a list of dicts of tensors or a DataLoader);
            the first `config.num_calibration_batches` are used at every pruning step.
        calibration_key (`str`, *optional*): internal; lets a callback re-created from a checkpoint find its
            calibration data.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from hf_compress import PruningCallback, PruningConfig
    >>> config = PruningConfig(sparsity=0.5, schedule="cubic", start_step=0, end_step=800, frequency=50)
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PruningCallback(config)])
    >>> trainer.train()
    >>> trainer.save_model()  # a plain checkpoint, 50% of the block weights are zeros
    ```
    """

    def __init__(self, config: PruningConfig | dict, calibration_data=None, calibration_key: str | None = None):
        if isinstance(config, dict):
            try:
                config = PruningConfig(**config)
            except TypeError as err:  # an unknown key: name the argument it came in
                raise InvalidArgumentTypeError(f"config={config!r} is not a valid PruningConfig: {err}.") from None
        if not isinstance(config, PruningConfig):
            raise InvalidArgumentTypeError(f"config must be a PruningConfig or a dict, got {type(config).__name__}.")
        if calibration_key is not None and (not isinstance(calibration_key, str) or not calibration_key):
            raise InvalidArgumentTypeError(f"calibration_key={calibration_key!r} must be a non-empty string or None.")
        if calibration_data is None and calibration_key is not None:
            previous = _LIVE_CALLBACKS.get(calibration_key)
            calibration_data = previous.calibration_data if previous is not None else None
        _check_calibration_data(calibration_data)
        if config.requires_calibration and calibration_data is None:
            raise ValueError(
                f"method={config.method!r} needs calibration_data: pass a few batches of model inputs, e.g. "
                "PruningCallback(config, calibration_data=[next(iter(dataloader)) for _ in range(8)])."
            )
        self.config = config
        self.calibration_data = calibration_data
        self.calibration_key = calibration_key
        if calibration_data is not None:
            self.calibration_key = calibration_key or uuid.uuid4().hex
            _LIVE_CALLBACKS[self.calibration_key] = self
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity_target = 0.0
        self.last_pruning_step: int | None = None
        self._modules: dict[str, nn.Module] | None = None
        self._trainable: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layer_sparsity: dict[str, float] = {}
        self._kept: dict[str, int] = {}
        self._numel: dict[str, int] = {}
        self._scorer = get_scorer_class(config.method)()
        self._ddp_timeout: float | None = None

    # ExportableState: the Trainer stores this in trainer_state.json of every checkpoint.
    def state(self) -> dict:
        return {
            "args": {"config": self.config.to_dict(), "calibration_key": self.calibration_key},
            "attributes": {"sparsity_target": self.sparsity_target, "last_pruning_step": self.last_pruning_step},
            # Files on_save adds to the checkpoint: a checkpoint without them is incomplete (see utils.checkpoints).
            "checkpoint_files": [MASKS_NAME] if self.masks else [],
        }

    @property
    def sparsity(self) -> float:
        """Current fraction of pruned weights among the targeted ones."""
        if not self.masks:
            return 0.0
        return 1 - sum(self._kept.values()) / sum(self._numel.values())

    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        modules = self._modules
        self.masks = {name: _shard_like(mask, modules[name].weight) for name, mask in masks.items()}
        apply_masks_(modules, self.masks)
        # Counted once here: for DTensor masks a count is a collective, which on_log (rank-local) must not run.
        self._kept = {name: num_kept(m, modules[name].weight) for name, m in self.masks.items()}
        # Whole-weight sizes: a ZeRO-3 mask is this rank's flat partition.
        self._numel = {name: logical_numel(modules[name].weight) for name in self.masks}
        # Only weights the optimizer updates need re-masking after a step (frozen PEFT base layers do not).
        self._trainable = [
            (modules[name].weight, mask) for name, mask in self.masks.items() if modules[name].weight.requires_grad
        ]
        self._layer_sparsity = {name: 1 - self._kept[name] / self._numel[name] for name in self.masks}

    def _prune(self, model: nn.Module, step: int) -> None:
        # NaN/inf weights would get NaN scores, and topk over NaN picks an arbitrary mask: stop, naming the modules.
        check_finite_weights(self._modules, "PruningCallback", step)
        target = sparsity_at_step(self.config, step)
        if self._scorer.requires_calibration:
            self._scorer.prepare(model, self._modules, self.calibration_data, self.config.num_calibration_batches)
        masks = compute_masks(
            model,
            self.config,
            sparsity=target,
            previous_masks=self.masks or None,
            modules=self._modules,
            scorer=self._scorer,
        )
        self._set_masks(_broadcast_masks(masks, self._ddp_timeout, f"PruningCallback at step {step}"))
        self.sparsity_target = target
        self.last_pruning_step = step
        logger.info(f"Pruning at step {step}: target {target:.4f}, sparsity {self.sparsity:.4f}")

    def _find_checkpoint_masks(self, args, state) -> str | None:
        resumed = resumed_checkpoint_folder(args)
        if resumed is not None:  # the folder is known: its masks or none (an incomplete checkpoint)
            path = os.path.join(resumed, MASKS_NAME)
            return path if os.path.isfile(path) else None
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", MASKS_NAME)
        return path if os.path.isfile(path) else None

    def _restore(self, args, state) -> None:
        saved = saved_callback_state(state, self)
        scheduled = last_pruning_step_at_or_before(self.config, state.global_step)
        path = self._find_checkpoint_masks(args, state)
        if not saved or "attributes" not in saved:
            if scheduled is not None or path is not None:
                raise ValueError(
                    f"Resuming at step {state.global_step}: the checkpoint's trainer_state.json holds no "
                    f"{type(self).__name__} state (stateful_callbacks: {sorted(state.stateful_callbacks or {})}), "
                    "but the schedule has pruned by this step"
                    + (f" and {path} exists" if path else "")
                    + ". The checkpoint was written without this callback or its state was removed; resume from a "
                    "checkpoint written with the same callbacks, or start the pruning run afresh."
                )
            return  # pruning starts later in this run: nothing to restore
        self.sparsity_target = saved["attributes"].get("sparsity_target", 0.0)
        self.last_pruning_step = saved["attributes"].get("last_pruning_step")
        if self.last_pruning_step is None:
            return
        if path is not None:
            masks = load_verified_masks(path, self._modules, self.config, self.sparsity_target)
        elif resumed_checkpoint_folder(args) is not None:
            raise CorruptCheckpointError(
                f"{os.path.join(resumed_checkpoint_folder(args), MASKS_NAME)} is missing, but the checkpoint's "
                f"trainer state records pruning at step {self.last_pruning_step}: the save was interrupted. Resume from an "
                "earlier checkpoint (trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir)))."
            )
        else:
            # The checkpoint's weights hold the zeros; a kept weight that is exactly 0.0 would be taken as pruned.
            logger.warning(
                f"No {MASKS_NAME} found for step {state.global_step}; rebuilding pruning masks from the zeros of the "
                "loaded weights."
            )
            masks = {}
            for name, module in self._modules.items():  # whole weights (FSDP2 / ZeRO-3: gathered, collective)
                masks[name] = full_tensor(module.weight).detach() != 0
        self._set_masks(_broadcast_masks(masks, self._ddp_timeout, f"PruningCallback resuming at {state.global_step}"))

    def _check_schedule_fits(self, max_steps: int | None) -> None:
        """Before the first step: a schedule that starts after the run ends is an error; one whose last step is past
        the end is warned about with the sparsity the run will reach."""
        if not max_steps or max_steps <= 0:
            return
        config = self.config
        if config.start_step > max_steps:
            raise ValueError(
                f"start_step={config.start_step} is after the run's last step (max_steps={max_steps}): the model "
                "would never be pruned. Lower start_step or train longer."
            )
        shortfall = schedule_shortfall(config, max_steps)
        if shortfall is not None:
            last, reachable_step, reachable = shortfall
            logger.warning(
                f"PruningCallback: end_step={last} is after the run's last step (max_steps={max_steps}): the schedule "
                f"stops at step {reachable_step} with sparsity {reachable:.4f} instead of "
                f"{config.target_sparsity:.4f}. Lower end_step or train longer to reach the target."
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("PruningCallback needs the model in on_train_begin (use it with a transformers Trainer).")
        model = unwrap_model(model)
        self._modules = get_pruning_targets(model, self.config)
        self.masks = {}
        self._check_schedule_fits(getattr(state, "max_steps", 0) or getattr(args, "max_steps", 0))
        ensure_callback_state_slot(state, self)  # a resumed checkpoint without this callback must still save
        honour_ddp_timeout(args)
        self._ddp_timeout = getattr(args, "ddp_timeout", None)
        if state.is_world_process_zero and str(getattr(args, "save_strategy", "no")) not in ("no", "SaveStrategy.NO"):
            check_writable_folder("output_dir", args.output_dir)  # checkpoints (and the masks in them) go there
        if state.global_step > 0:
            self._restore(args, state)
        elif is_pruning_step(self.config, 0):
            self._prune(model, 0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._scorer.observes_training and self._modules is not None:
            self._scorer.observe_step(self._modules)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        # Right after optimizer.step(): pruned weights go back to exactly zero whatever Adam's state says.
        for weight, mask in self._trainable:
            mul_(weight, mask)  # ZeRO-3: the 16-bit partition and the optimizer's fp32 master partition

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if is_pruning_step(self.config, step) and step != self.last_pruning_step:
            self._prune(unwrap_model(model), step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._modules is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return
        layers = self._layer_sparsity.values() or [0.0]
        values = {
            "sparsity_targeted": round(self.sparsity, 6),
            "sparsity_scheduled": round(self.sparsity_target, 6),
            "sparsity_layer_min": round(min(layers), 6),
            "sparsity_layer_max": round(max(layers), 6),
        }
        logs.update(values)
        # The Trainer appended the logs to log_history before calling callbacks; keep the history complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if not self.masks:
            return
        # Whole masks in the checkpoint; gathering DTensor shards / ZeRO-3 partitions is a collective, so every rank
        # takes part.
        masks = {name: _full_mask(mask, self._modules[name].weight) for name, mask in self.masks.items()}
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            # Atomic, with a checksum and what the masks should hold, verified by load_verified_masks on resume.
            save_masks(folder, masks, self.config, self.sparsity_target, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.masks and model is not None:
            make_pruning_permanent_(model, self.masks)
            logger.info(f"Pruning made permanent: sparsity {self.sparsity:.4f} over {len(self.masks)} modules")
