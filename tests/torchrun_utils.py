"""Launching multi-process (torchrun, gloo on CPU) test scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence


def free_port() -> str:
    """A free TCP port: other multiprocess tests (and other people's test runs) may use the machine at the same time,
    so a fixed master port can be taken."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(
    script_and_args: Sequence[str],
    *,
    nproc: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    cwd: str | None = None,
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N --master_port <free> script args...` with one OpenMP
    thread per process; `env["PYTHONPATH"]` is put in front of the caller's. Scripts must end with `torch.distributed.destroy_process_group()`: a process that exits with
    its gloo group alive can abort at interpreter shutdown ("terminate called without an active exception", see
    pytorch/pytorch#190489)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if env and "PYTHONPATH" in env:  # in front of the caller's, so the worktree's hf_compress stays importable
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [env["PYTHONPATH"], os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", free_port()]
    return subprocess.run(
        [*cmd, *script_and_args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
