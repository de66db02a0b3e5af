"""`GracefulShutdownCallback`: preemption and time limits end a run with a checkpoint, not with nothing."""

from __future__ import annotations

import signal
import sys
import threading

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .reliability import honour_ddp_timeout
from .validation import InvalidArgumentTypeError, check_int, check_writable_folder

logger = logging.get_logger(__name__)


def _as_signal(value) -> signal.Signals:
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if hasattr(signal, name) and isinstance(getattr(signal, name), signal.Signals):
            return getattr(signal, name)
        raise ValueError(f"signals: {value!r} is not a signal name of this platform (e.g. 'SIGTERM', 'SIGUSR1').")
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ValueError(f"signals: {value!r} is not a signal number of this platform.") from None
    raise InvalidArgumentTypeError(f"signals: {value!r} is not a signal (a name such as 'SIGTERM' or a number).")


class GracefulShutdownCallback(TrainerCallback):
    r"""
    On SIGTERM or SIGUSR1 (preemption, a cluster's time limit, `kill`), finish the optimizer step in progress,
    save a checkpoint, and exit; `resume_from_checkpoint` then continues exactly where the run stopped (the same
    weights, optimizer state, data order, RNG states and callback states as an uninterrupted run).

    The handler only records the signal; the step in progress completes, then `on_step_end` asks the Trainer to save
    and stop. The process exits after every callback's `on_save` has run (so files callbacks add to the checkpoint,
    such as pruning masks, are written) and before `on_train_end`, so nothing that belongs to the end of a finished
    run (a quantized export, masks baked into the weights) is done for the interrupted one. Under torch.distributed
    the ranks agree on the stop step (one all-reduce of a flag per step) and wait for each other before exiting.

    Schedulers send the signal some time before a hard kill (SLURM: `--signal=TERM@120`, Kubernetes:
    `terminationGracePeriodSeconds`); one optimizer step plus one checkpoint must fit in it.

    Args:
        signals (`list[str | int]`, *optional*, defaults to `["SIGTERM", "SIGUSR1"]`): the signals handled.
        exit_code (`int`, *optional*): the process's exit status after the save. Defaults to 128 + the signal
            number (143 for SIGTERM), the status of a process ended by that signal, so `train.py && export.py` does
            not go on with an unfinished model and schedulers see an interrupted job. `0` exits as a success.
        exit_process (`bool`, *optional*, defaults to `True`): `False` stops training and returns from
            `trainer.train()` instead of exiting (check `callback.received_signal`); `on_train_end` then runs as for a finished run.

    Example:

    >>> from hf_compress import GracefulShutdownCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GracefulShutdownCallback()])
    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))  # doctest: +SKIP
    """

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), exit_code: int | None = None, exit_process: bool = True):
        if isinstance(signals, (str, int)):
            signals = [signals]
        if not isinstance(signals, (list, tuple)) or not signals:
            raise InvalidArgumentTypeError(f"signals={signals!r} must be a non-empty list of signal names or numbers.")
        self.signals = [_as_signal(s) for s in signals]
        forbidden = [s.name for s in self.signals if s in (signal.SIGKILL, signal.SIGSTOP)]
        if forbidden:
            raise ValueError(f"signals={forbidden} cannot be handled by any process; use SIGTERM or SIGUSR1.")
        self.exit_code = check_int("exit_code", exit_code, low=0, high=255, allow_none=True)
        if not isinstance(exit_process, bool):
            raise InvalidArgumentTypeError(f"exit_process={exit_process!r} must be True or False.")
        self.exit_process = exit_process
        self.received_signal: int | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._stopping = False
        self._saved = False

    # --------------------------------------------------------------------------- handlers
    def _handle(self, signum, frame) -> None:
        # Async-signal context: record only; the Trainer acts on it at the end of the step.
        if self.received_signal is None:
            self.received_signal = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "GracefulShutdownCallback: not in the main thread, where Python delivers signals; inactive."
            )
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    # --------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.received_signal, self.stopped_at_step = None, None
        self._stopping = self._saved = False
        honour_ddp_timeout(args)
        if state.is_world_process_zero:
            check_writable_folder("output_dir", args.output_dir)  # the checkpoint must be writable when it counts
        self._install()

    def _all_ranks_flag(self, args) -> bool:
        flag = self.received_signal is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
                tensor = torch.tensor([int(flag)], device=device)
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
                flag = bool(tensor.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if not self._stopping and self._all_ranks_flag(args):
            self._stopping = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
            name = signal.Signals(self.received_signal).name if self.received_signal else "a signal on another rank"
            logger.warning(
                f"GracefulShutdownCallback: {name} received; saving a checkpoint at step {state.global_step} and "
                "stopping."
            )
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._stopping:
            self._saved = True  # exit at the next event, after every callback's on_save has written its files

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._stopping and self._saved:
            self._finish(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _finish(self, args, state) -> None:
        self._restore()
        if not self.exit_process:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 may still be writing; bounded by ddp_timeout
        code = self.exit_code if self.exit_code is not None else 128 + int(self.received_signal or signal.SIGTERM)
        logger.warning(
            f"GracefulShutdownCallback: checkpoint-{state.global_step} saved in {args.output_dir}; exiting with "
            f"status {code}. Resume with trainer.train(resume_from_checkpoint=True)."
        )
        sys.exit(code)


__all__ = ["GracefulShutdownCallback"]
