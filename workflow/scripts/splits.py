import os
from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.splits import make_splits

start_job(snakemake)
if snakemake.params.data_dir:  # the dir the DAG declared its inputs from, whatever this job's environment says
    os.environ["SEMALIGN_DATA_DIR"] = snakemake.params.data_dir
sizes = dict(snakemake.params.sizes)
test_size = sizes.pop("test")
manifest = make_splits(snakemake.wildcards.task, sizes, test_size, snakemake.params.seed,
                       Path(snakemake.output.manifest).parent, snakemake.params.keep_contaminated)
print(manifest)
