import os
from pathlib import Path

from semalign.suite.bootstrap import bootstrap_student
from semalign.suite.jobs import start_job
from semalign.suite.pipeline import resolve_device

start_job(snakemake)
if snakemake.params.data_dir:  # the dir the DAG declared its inputs from, whatever this job's environment says
    os.environ["SEMALIGN_DATA_DIR"] = snakemake.params.data_dir
summary = bootstrap_student(
    Path(snakemake.input.model).parent,
    Path(snakemake.output[0]).parent,
    seed=snakemake.params.seed,
    device=resolve_device(snakemake.params.device),
    **snakemake.params.bootstrap,
)
print(summary)
