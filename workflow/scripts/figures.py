from pathlib import Path

import pandas as pd

from semalign.pipeline import start_job
from semalign.report import cost_gain_figure, main_figure

start_job(snakemake)
p, out = snakemake.params, snakemake.output
summary = pd.read_csv(snakemake.input.summary)
main_figure(summary, p.methods, p.tasks, Path(out.main).with_suffix(""))
cost_gain_figure(pd.read_csv(Path(snakemake.input.cost).with_suffix(".csv")), summary, Path(out.cost_gain).with_suffix(""))
at_seeds = pd.read_csv(snakemake.input.ablation_summary[0]) if p.ablation_rows else None
for (name, rows), path in zip(p.ablation_rows.items(), out.ablations):
    method, key = name.split("__")
    main_figure(at_seeds, [n for _, n in rows], p.ablation_tasks, Path(path).with_suffix(""),
                labels={n: f"{key}={label}" for label, n in rows}, title=f"Ablation of {method}: {key}")
