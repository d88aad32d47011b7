"""What every rule script runs first, importing nothing heavy: a job that loads no model (splits, contamination,
tables, figures, the run manifest) then never imports torch, which with transformers is ~5 s of every job's start."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any


def start_job(smk: Any) -> None:
    """Log to the rule's log file (tqdm and warnings go to stderr) and use exactly the threads the scheduler
    granted, so parallel jobs do not oversubscribe the cores: torch's pool when the script has imported torch, and
    OpenMP's variable for a torch (or a subprocess) started later. A job computing on the CPU keeps the memory it
    frees (:func:`keep_freed_memory`); on a GPU its large blocks live on the device, and the host memory a CUDA job
    holds is left as the plan counts it."""
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr = sys.stdout = open(log_path, "w", buffering=1)
    threads = max(1, int(smk.threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)
        if smk.config.get("device", "auto") == "cpu" or not torch.cuda.is_available():
            keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and never hand freed memory back to the kernel; False
    off glibc (macOS; musl's mallopt does nothing), where nothing changes.

    Why: glibc serves a block over 32 MB (a batch's logits over a 49k vocabulary, their gradients) with a fresh
    mmap and unmaps it on free, so the kernel faults in and zeroes every page again at the next step. On mini a
    fifth of the main command's CPU time was the kernel's; with this, a KD transfer job took 41 s instead of 49 and
    4.2 M page faults fell to 0.6 M, a teacher GSM8K evaluation ~10% less (README "Quick start"). The price: a job
    holds its peak memory until it exits, and heap fragmentation adds to the peak (KD's RSS 1.9 -> 2.3 GB), within
    the SLURM request's ``plan.safety`` margin over the plan's working set."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
