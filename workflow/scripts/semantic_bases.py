from pathlib import Path

from semalign.bases import decomposition_report
from semalign.suite.io import read_jsonl
from semalign.suite.jobs import start_job

start_job(snakemake)
p, out = snakemake.params, snakemake.output
records = [r for f in snakemake.input.splits for r in read_jsonl(Path(f).parent / "extract.jsonl")[: p.per_task]]
decomposition_report(Path(snakemake.input.model).parent, records, p.max_len, Path(out.csv), Path(out.png), seed=p.seed,
                     title=f"semantic decomposition: {snakemake.wildcards.model}")
