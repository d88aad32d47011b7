import os
from pathlib import Path

from semalign.suite.manifest import write_manifest
from semalign.suite.pipeline import start_job

start_job(snakemake)
write_manifest(snakemake.output[0], Path(snakemake.params.repo), os.environ.get("SEMALIGN_COMMAND", ""))
