from pathlib import Path

import pandas as pd

from semalign.suite.figures import loss_curves_figure
from semalign.suite.jobs import start_job

start_job(snakemake)
wc = snakemake.wildcards
# trained methods write loss_curve.csv beside their transfer record; a plugin method may not keep one
files = {m: Path(f).with_name("loss_curve.csv") for m, f in snakemake.input.items()}
for m in [m for m, f in files.items() if not f.exists()]:
    print(f"[loss_curves] {m} wrote no loss_curve.csv: not plotted")
curves = {m: pd.read_csv(f) for m, f in files.items() if f.exists()}
loss_curves_figure(curves, Path(snakemake.output.png).with_suffix(""),
                   f"Training curves, {wc.pair} / {wc.task}, seed {snakemake.params.seed}")
