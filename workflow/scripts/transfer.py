from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.pipeline import job_context, run_transfer

start_job(snakemake)
out = Path(snakemake.output[0])
ctx = job_context(snakemake, out.parent, seed=int(snakemake.wildcards.seed))
print(run_transfer(snakemake.params.method, ctx, out, label=snakemake.wildcards.method))
