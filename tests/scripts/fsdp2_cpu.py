"""Run a script under accelerate's FSDP2 path on CPU processes (gloo), for tests.

Accelerate only switches a run to FSDP on accelerators: a multi-CPU launch with the FSDP config stays plain
MULTI_CPU (DDP). torch's `fully_shard` itself runs on CPU with gloo, so this shim lets `AcceleratorState` keep the
FSDP2 plugin accelerate built from the `FSDP_*` environment and turns the MULTI_CPU state into an FSDP one; the
Trainer then shards the student (and `DistillationTrainer` the teacher) with accelerate's own `fsdp2_prepare_model`,
as on GPUs. Usage, under `accelerate launch --multi_gpu --num_processes 2` with `ACCELERATE_USE_CPU=1`:

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... python tests/scripts/fsdp2_cpu.py SCRIPT [ARGS...]

Test-only: it patches accelerate in this process and nothing else.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # Later `AcceleratorState()` calls copy PartialState's type over this one: keep both in step.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
