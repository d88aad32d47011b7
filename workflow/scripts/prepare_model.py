from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.models import prepare_model

start_job(snakemake)
manifest = prepare_model(snakemake.params.spec, Path(snakemake.output[0]).parent, seed=snakemake.params.seed)
print(manifest)
