import os
from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.manifest import write_manifest

start_job(snakemake)
write_manifest(snakemake.output[0], Path(snakemake.params.repo), os.environ.get("SEMALIGN_COMMAND", ""))
