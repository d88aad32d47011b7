from pathlib import Path

from semalign.bootstrap import bootstrap_student
from semalign.pipeline import resolve_device, start_job

start_job(snakemake)
summary = bootstrap_student(
    Path(snakemake.input[0]).parent,
    Path(snakemake.output[0]).parent,
    seed=snakemake.params.seed,
    device=resolve_device(snakemake.params.device),
    **snakemake.params.bootstrap,
)
print(summary)
