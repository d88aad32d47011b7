"""What every rule script runs first, importing nothing heavy: a job that loads no model (splits, contamination,
tables, figures, the run manifest) then never imports torch, which with transformers is ~5 s of every job's start."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def start_job(smk: Any) -> None:
    """Log to the rule's log file (tqdm and warnings go to stderr) and use exactly the threads the scheduler
    granted, so parallel jobs do not oversubscribe the cores: torch's pool when the script has imported torch, and
    OpenMP's variable for a torch (or a subprocess) started later."""
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr = sys.stdout = open(log_path, "w", buffering=1)
    threads = max(1, int(smk.threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)
