from pathlib import Path

from semalign.attribution import attribution_report
from semalign.suite.io import read_jsonl
from semalign.suite.jobs import start_job
from semalign.suite.pipeline import resolve_device

start_job(snakemake)
p, out = snakemake.params, snakemake.output
attribution_report(
    Path(snakemake.input.teacher).parent,
    read_jsonl(Path(snakemake.input.splits).parent / "extract.jsonl"),
    p.max_len,
    Path(out.csv),
    Path(out.png),
    methods=(snakemake.wildcards.attribution,),
    batch_size=p.batch_size,
    seed=p.seed,
    device=resolve_device(p.device),
    title=f"teacher attribution: {snakemake.wildcards.pair} / {snakemake.wildcards.task}",
)
