"""The pinned environment: constraints.txt agrees with pyproject's ranges and is what this environment runs (CI
installs with it), and the results manifest records the environment that produced a run."""
from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from semalign.suite import manifest

REPO = Path(__file__).resolve().parents[1]


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and "+" not in version, f"constraints.txt: {line!r} is not an exact public pin"
            assert canonicalize_name(name) not in pins, f"constraints.txt: {name} pinned twice"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def direct_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11: no tomllib to read pyproject.toml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]


def test_constraints_satisfy_pyproject_ranges():
    """Every direct dependency is pinned, inside its pyproject range; the project itself is not pinned."""
    pins = constraints()
    assert canonicalize_name(manifest.PROJECT) not in pins
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (a direct dependency)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates '{req}'"
    assert pins["torch"] == Version("2.13.0")


@pytest.mark.parametrize("name", manifest.KEY_PACKAGES)
def test_installed_versions_are_the_constraints(name):
    """CI installs with constraints.txt, so what runs is what it pins (local labels aside: 2.13.0+cpu is 2.13.0);
    a mismatch means the environment, or the file, is stale: regenerate with the command in its header."""
    assert Version(metadata.version(name)).public == str(constraints()[canonicalize_name(name)])


def test_constraints_keep_requirements_and_drop_local_labels():
    freeze = ["torch==2.13.0+cpu", "-e /work/main", "lm_eval==0.4.13", "ruff==0.17.6"]
    assert manifest.constraints(freeze, {"torch", "lm-eval"}) == ["lm_eval==0.4.13", "torch==2.13.0"]


def test_closure_follows_extras_and_markers():
    """Every direct dependency is in the closure, pytest only through the test extra, and an extra requested
    further down (datasets -> fsspec[http]) is followed to its own requirements."""
    closure = manifest.installed_closure()
    assert {canonicalize_name(r.name) for r in direct_requirements()} <= closure
    assert "pytest" not in manifest.installed_closure(extras=())
    if "http" in (metadata.metadata("fsspec").get_all("Provides-Extra") or []):
        assert "aiohttp" in closure


def test_run_manifest_records_the_environment(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("1")
    (repo / "results" / "mini").mkdir(parents=True)
    (repo / "results" / "mini" / "main.csv").write_text("x")  # committed reference results
    subprocess.run(git + ["add", "a.txt", "results"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        m = manifest.write_manifest(tmp_path / "manifest.json", repo, "snakemake --cores 3")
    finally:
        torch.set_num_threads(threads)
    assert m["git"] == {"commit": head, "dirty": False} and m["command"] == "snakemake --cores 3"
    assert m["torch_threads"]["intra_op"] == 3 and m["machine"]["cpu_count"] == os.cpu_count()
    assert m["machine"]["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256"}
    if Path("/proc/cpuinfo").exists():  # Linux: the model name as /proc/cpuinfo gives it
        assert m["machine"]["cpu"] and m["machine"]["cpu"] in Path("/proc/cpuinfo").read_text()
    assert m["versions"]["torch"] == metadata.version("torch")
    assert any(line.lower().startswith(("lm_eval==", "lm-eval==")) for line in m["pip_freeze"])
    (repo / "results" / "mini" / "main.csv").write_text("y")  # the run rewrote them: the code is still HEAD's
    assert manifest.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert manifest.git_state(repo) == {"commit": head, "dirty": True}
    assert manifest.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_ci_runs_the_readme_test_command_with_the_constraints():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "-c constraints.txt" in command and f"\n{command}\n" in (REPO / "README.md").read_text()
