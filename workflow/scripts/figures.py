from pathlib import Path

import pandas as pd

from semalign.pipeline import redirect_log
from semalign.report import main_figure

redirect_log(snakemake.log[0])
summary = pd.read_csv(snakemake.input.summary)
main_figure(summary, snakemake.params.methods, snakemake.params.tasks, Path(snakemake.output.main).with_suffix(""))
