"""The tests' warm Snakemake (tests/warm_snakemake.py) serves each call as a fresh `python -m snakemake` would: its own
argv, environment, working directory and captured output (the jobs' too), from one interpreter."""
from __future__ import annotations

import os
from pathlib import Path

from warm_snakemake import warm_snakemake

SNAKEFILE = """
import os, sys
print("pid", os.getpid(), "argv", sys.argv[1:][-1], "cwd", os.getcwd(), file=sys.stderr)
print("env", os.environ.get("WARM_TEST"), os.environ.get("WARM_LEAK"), file=sys.stderr)
os.environ["WARM_LEAK"] = "set by the Snakefile"  # as common.smk sets PYTHONPATH for its jobs
if config.get("fail"):
    raise SystemExit("stopped: " + config["fail"])

rule all:
    shell: "echo job-stdout; echo job-stderr >&2"
"""


def _call(tmp_path: Path, name: str, *args: str, **env: str):
    work = tmp_path / name
    work.mkdir()
    argv = ["--snakefile", str(tmp_path / "Snakefile"), "--cores", "1", *args]  # the working directory: cwd
    res = warm_snakemake(argv, env={**os.environ, "PYTHONPATH": str(tmp_path), **env}, cwd=work, timeout=300)
    said = dict(line.split(" ", 1) for line in res.stderr.splitlines() if line.startswith(("pid", "env")))
    return res, said, work


def test_each_call_as_a_fresh_process_in_one_interpreter(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    first, said1, work1 = _call(tmp_path, "a", "--forceall", WARM_TEST="first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert said1["env"] == "first None"
    assert said1["pid"].endswith(f"argv --forceall cwd {work1}")
    assert "job-stdout" in first.stdout and "job-stderr" in first.stderr  # the job's descriptors are the call's

    second, said2, work2 = _call(tmp_path, "b", "--config", "fail=by design")
    assert said2["env"] == "None None"  # neither the last call's env nor what its Snakefile set
    assert said2["pid"].endswith(f"argv fail=by design cwd {work2}")
    assert second.returncode == 1 and "stopped: by design" in second.stderr  # SystemExit's message, as at exit
    assert "job-stdout" not in second.stdout + first.stderr
    assert said1["pid"].split()[0] == said2["pid"].split()[0]  # one warm interpreter served both
