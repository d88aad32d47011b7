from pathlib import Path

from semalign.bases import build_aligned_map
from semalign.method import AlignedMap
from semalign.suite.jobs import start_job

start_job(snakemake)
inp = snakemake.input
fold = AlignedMap(snakemake.wildcards.lens).folded
print(build_aligned_map(Path(inp.teacher).parent, Path(inp.student).parent, Path(snakemake.output[0]), device="cpu",
                        fold=fold))
