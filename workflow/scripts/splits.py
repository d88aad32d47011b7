from pathlib import Path

from semalign.data import make_splits
from semalign.pipeline import start_job

start_job(snakemake)
sizes = dict(snakemake.params.sizes)
test_size = sizes.pop("test")
manifest = make_splits(snakemake.wildcards.task, sizes, test_size, snakemake.params.seed, Path(snakemake.output.manifest).parent)
print(manifest)
