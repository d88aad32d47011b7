"""What produced a set of results: the code (git commit), the exact package versions (``pip freeze``), the threads,
the machine and the command. Results depend on library versions (lm-eval's task handling, transformers'
generation, peft's LoRA init), so every profile's results carry one (``results/<profile>/manifest.json``).

``python -m semalign.suite.manifest constraints`` prints this environment's versions of every package the project
installs (its dependencies and theirs, with the test extra): how ``constraints.txt`` is regenerated.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from semalign.suite.io import atomic_write_text

PROJECT = "semalign-bench"
KEY_PACKAGES = ("torch", "transformers", "lm-eval", "peft", "snakemake")  # what the numbers depend on most


def pip_freeze() -> list[str]:
    """``pip freeze`` of the running interpreter, one requirement per line."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def installed_closure(root: str = PROJECT, extras: tuple[str, ...] = ("test",)) -> set[str]:
    """Canonical names of every installed distribution ``root[extras]`` pulls in, transitively, markers evaluated
    for this interpreter: the packages the project installs (``root`` itself excluded)."""
    done: dict[str, set[str]] = {}  # name -> extras already followed (a later `fsspec[http]` adds aiohttp)
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # a requirement of an optional backend that is not installed here
        for req in map(Requirement, requires):
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
                continue
            key = canonicalize_name(req.name)
            if key not in done or not set(req.extras) <= done[key]:
                done[key] = done.get(key, set()) | set(req.extras)
                todo.append((req.name, done[key]))
    return set(done) - {canonicalize_name(root)}


def constraints(freeze: list[str], closure: set[str]) -> list[str]:
    """``name==version`` for each package of ``freeze`` in ``closure`` (editable and URL lines dropped), without
    local version labels: ``torch==2.13.0`` admits the CPU and CUDA builds (2.13.0+cpu, +cu128) alike."""
    pins = [line.split("==") for line in freeze if "==" in line and not line.startswith("-e")]
    return sorted((f"{name}=={Version(v).public}" for name, v in pins if canonicalize_name(name) in closure),
                  key=str.lower)


def git_state(repo: Path) -> dict:
    """HEAD commit and whether tracked files other than the committed reference results differ from it (a run
    rewrites those: they say nothing about the code that made it); Nones outside a git checkout."""
    def git(*args: str) -> str | None:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo): with the SIMD level torch dispatches to, it explains why the same
    commit gives slightly different floats on another machine (a different kernel sums in a different order)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def run_manifest(repo: Path, command: str) -> dict:
    """Everything needed to rerun, or explain a difference from, a set of results."""
    import torch

    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": git_state(repo),
        "python": sys.version.split()[0],
        "versions": versions,
        "torch_threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
                    "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "pip_freeze": pip_freeze(),
    }


def write_manifest(path: str | Path, repo: Path, command: str) -> dict:
    manifest = run_manifest(repo, command)
    atomic_write_text(Path(path), json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    if sys.argv[1:] != ["constraints"]:
        sys.exit("usage: python -m semalign.suite.manifest constraints > constraints.txt")
    header = [f"# The exact versions CI runs with (Python {platform.python_version()}, {platform.system()} "
              f"{platform.machine()}): `pip install -c constraints.txt -e .`. pyproject.toml keeps the ranges.",
              "# Regenerate: python -m semalign.suite.manifest constraints > constraints.txt"]
    sys.stdout.write("\n".join(header + constraints(pip_freeze(), installed_closure())) + "\n")
