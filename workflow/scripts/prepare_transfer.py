from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.pipeline import job_context, run_preparation

start_job(snakemake)
out = Path(snakemake.output[0])
print(run_preparation(snakemake.wildcards.method, job_context(snakemake, out.parent), out))  # no seed: shared by all
