from pathlib import Path

import pandas as pd

from semalign.pipeline import start_job
from semalign.report import main_figure

start_job(snakemake)
summary = pd.read_csv(snakemake.input.summary)
main_figure(summary, snakemake.params.methods, snakemake.params.tasks, Path(snakemake.output.main).with_suffix(""))
