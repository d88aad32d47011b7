"""Transfer cost of every method on one (pair, task): same data, same epochs, each method in a fresh process.

A fresh process per method makes peak RSS and GPU memory each method's own (a shared process only ever reports
the largest so far) and stops one method's allocator state or threads from slowing the next. The inputs are
what the DAG builds (prepared models, splits, pairings, the teacher cache), so run it through the workflow:

    snakemake --cores all results/mini/bench/transfer_cost.md

Writes ``results/<profile>/bench/transfer_cost.{json,md,csv,tex}``: per method wall time and its ratio to KD,
peak memory, trainable parameters, teacher forwards and student layer passes per example, and throughput
(see :func:`semalign.suite.tables.cost_table`). The cache's one teacher forward per example is counted once, in the
rows of the methods that read it, and its build time is reported beside the table (it is shared by them).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BASE_KEYS = ("teacher", "student", "splits")


def child(spec_file: Path) -> None:
    """Run one method, as the transfer rule would, and write its cost record with its time per component."""
    from semalign.suite import timing
    from semalign.suite.jobs import keep_freed_memory
    from semalign.suite.pipeline import run_transfer
    from semalign.suite.registry import TransferContext

    spec = json.loads(spec_file.read_text())
    if spec["device"] == "cpu":  # as start_job does in a transfer job
        keep_freed_memory()
    inputs = {k: Path(v) for k, v in spec["inputs"].items()}
    ctx = TransferContext(
        teacher=inputs["teacher"].parent,
        student=inputs["student"].parent,
        splits=inputs["splits"].parent,
        task=spec["task"],
        out_dir=Path(spec["out_dir"]),
        params=spec["params"],
        seed=spec["seed"],
        device=spec["device"],
        max_len=spec["max_len"],
        train_on_inputs=spec["train_on_inputs"],
        artifacts={k: v for k, v in inputs.items() if k not in BASE_KEYS},
    )
    timing.enable()
    run_transfer(spec["method"], ctx, ctx.out_dir / "transfer.json")


def warm_page_cache(inputs: list[str]) -> None:
    """Read every input file once (a manifest stands for its whole model or split directory) so that no method is
    timed on cold disk reads that the next one is spared: run after the DAG, the first method to open the 1.7 GB
    teacher cache on mini paid ~20 s more than the others (KD 82.6 s in the table, 61.3 s when re-run alone)."""
    paths = {Path(f) for f in inputs}
    files = {g for f in paths for g in (f.parent.rglob("*") if f.name == "manifest.json" else [f])}
    for f in sorted(g for g in files if g.is_file()):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def run_all(smk) -> None:
    """Each method in its own ``python -m benchmarks.transfer_cost --child`` process, then the table."""
    from semalign.suite.io import atomic_write_text
    from semalign.suite.pipeline import resolve_device
    from semalign.suite.tables import cost_table, run_facts, write_table

    p, out_json = smk.params, Path(smk.output.json)
    work = out_json.parent / "transfer_cost"
    device = resolve_device(p.device)
    warm_page_cache(list(smk.input))
    records = []
    for method, inputs in p.inputs.items():
        spec = {"method": method, "task": p.task, "inputs": inputs, "out_dir": str(work / method),
                "params": p.method_params[method], "seed": p.seed, "device": device,
                "max_len": p.max_len, "train_on_inputs": p.train_on_inputs}
        spec_file = work / method / "spec.json"
        shutil.rmtree(spec_file.parent, ignore_errors=True)  # a re-run must train, not resume from its checkpoints
        spec_file.parent.mkdir(parents=True)
        spec_file.write_text(json.dumps(spec, indent=2))
        print(f"[transfer_cost] {method} ...", flush=True)
        with open(work / method / "run.log", "w") as log:
            subprocess.run([sys.executable, "-m", "benchmarks.transfer_cost", "--child", str(spec_file)],
                           stdout=log, stderr=subprocess.STDOUT, check=True)
        records.append(json.loads((work / method / "transfer.json").read_text()))
    facts = run_facts(*smk.input.facts, smk.input.cache)
    table = cost_table([{**r, "pair": p.pair} for r in records], {(p.pair, p.task): facts})
    cache_seconds = float(Path(smk.input.cache_benchmark).read_text().splitlines()[1].split("\t")[0])
    title = (f"Transfer cost, {p.pair} / {p.task}, {facts['n_train']} training examples, device {device}; the "
             f"shared teacher cache took {cache_seconds:.0f} s ({facts['cache_forwards']} teacher forwards)")
    breakdown = time_breakdown(records)
    write_table(table, out_json.with_suffix(""), title)
    write_table(breakdown, out_json.with_name("transfer_cost_breakdown"),
                f"Where the transfer time goes (seconds per component, {p.pair} / {p.task}; semalign.suite.timing)")
    atomic_write_text(out_json, json.dumps({"title": title, "cache_seconds": cache_seconds,
                                            "rows": table.to_dict("records"),
                                            "breakdown": breakdown.to_dict("records"), "records": records}, indent=2))


def time_breakdown(records: list[dict]):
    """Components x methods, seconds (exclusive, :mod:`semalign.suite.timing`), with each method's optimizer steps
    and its wall time, so that per-step costs can be compared at equal steps."""
    import pandas as pd

    from semalign.suite.timing import SECTIONS

    names = [*SECTIONS, "other (load, save, setup)"]
    cols = {r["method"]: r.get("time_breakdown", {}) for r in records}
    rows = [{"component": n, **{m: round(b.get(n, 0.0), 4) for m, b in cols.items()}} for n in names
            if any(b.get(n) for b in cols.values())]
    rows.append({"component": "wall", **{r["method"]: round(r["wall_seconds"], 2) for r in records}})
    rows.append({"component": "optimizer steps",
                 **{r["method"]: r.get("budget", {}).get("optimizer_steps", "") for r in records}})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    if "snakemake" in globals():
        from semalign.suite.jobs import start_job

        start_job(snakemake)  # noqa: F821
        run_all(snakemake)  # noqa: F821
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--child", type=Path, required=True, help="spec JSON written by the transfer_cost rule")
        child(parser.parse_args().child)
