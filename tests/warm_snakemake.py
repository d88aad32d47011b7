"""`python -m snakemake` for the tests, in an interpreter that stays warm between calls.

A Snakemake call spends ~5 s importing torch and transformers (the Snakefile imports the method registry and the
memory plan builds model skeletons) before its ~1 s of work, and the workflow tests make ~30 calls. Here one
interpreter per (pytest worker, PYTHONPATH) serves them one after another. Each call still sees what a fresh
`python -m snakemake` would: its own argv, environment and working directory, and file descriptors 0-2 of its own
(stdin empty; stdout and stderr captured at the descriptor level, so the jobs it starts write into them as before).
What it shares with the calls before it is the imported modules, and what they hold: the methods registered (a
`plugins:` module imported by one call stays registered for the next) and the memory plan's cached model shapes.
A test that needs either fresh must not use this runner (none does: no workflow test sets `plugins:`, and a copy
of the repository, as the smoke run's, gets an interpreter of its own).

Run as a script, it serves: one JSON request per line on stdin, one JSON reply per line on the stdout it started
with.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> int:
    """One `python -m snakemake *argv` in this process; its exit status."""
    from snakemake.cli import main

    saved = {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv, "fds": [os.dup(fd) for fd in (0, 1, 2)]}
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.devnull) as nothing, open(stdout, "w") as out, open(stderr, "w") as err:
        for fd, f in enumerate((nothing, out, err)):
            os.dup2(f.fileno(), fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [str(Path(main.__code__.co_filename).with_name("__main__.py")), *argv]
        try:
            main(argv)
            code = 0
        except SystemExit as e:  # as the interpreter ends on it: a non-int code is a message, exit status 1
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in enumerate(saved["fds"]):
                os.dup2(copy, fd)
                os.close(copy)
            os.environ.clear()
            os.environ.update(saved["env"])
            os.chdir(saved["cwd"])
            sys.argv = saved["argv"]
    return code


def serve() -> None:
    del sys.path[0]  # this script's dir (tests/): as under `python -m snakemake`, not importable
    reply = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        reply.write(json.dumps({"returncode": _run(**json.loads(line))}) + "\n")
        reply.flush()


class WarmSnakemake:
    """A client of one serving interpreter, started with the PYTHONPATH its calls import the workflow's packages
    from (a copy of the repository is a different interpreter)."""

    def __init__(self, pythonpath: str | None):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)

    def __call__(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                self.close(kill=True)
                raise subprocess.TimeoutExpired(["snakemake", *argv], timeout)
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the warm snakemake interpreter died (exit {self.proc.wait()})")
            return subprocess.CompletedProcess(["snakemake", *argv], json.loads(line)["returncode"],
                                               out.read_text(), err.read_text())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, kill: bool = False) -> None:
        if kill and self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)  # with the jobs it started
        self.proc.stdin.close()
        self.proc.wait()


_WARM: dict[str | None, WarmSnakemake] = {}


def warm_snakemake(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, snakemake, *argv], env=env, cwd=cwd, capture_output=True, text=True)`, warm."""
    key = env.get("PYTHONPATH")
    if key not in _WARM or not _WARM[key].alive():
        _WARM[key] = WarmSnakemake(key)
    return _WARM[key](argv, env, cwd, timeout)


@atexit.register
def _close_all() -> None:
    for runner in _WARM.values():
        runner.close()


if __name__ == "__main__":
    serve()
