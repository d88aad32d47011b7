from pathlib import Path

import pandas as pd

from semalign.suite.figures import cost_gain_figure, main_figure
from semalign.suite.jobs import start_job
from semalign.suite.paper import load_paper_reported, match_reported

start_job(snakemake)
p, out = snakemake.params, snakemake.output
summary = pd.read_csv(snakemake.input.summary)
tests = pd.read_csv(Path(snakemake.input.significance).with_suffix(".csv"))
paper = match_reported(load_paper_reported(snakemake.input.paper), p.pair_sources)
main_figure(summary, p.methods, p.tasks, Path(out.main).with_suffix(""), tests=tests, paper=paper)
cost_gain_figure(pd.read_csv(Path(snakemake.input.cost).with_suffix(".csv")), summary, Path(out.cost_gain).with_suffix(""))
at_seeds = pd.read_csv(snakemake.input.ablation_summary[0]) if p.ablation_axes else None
for axis, path in zip(p.ablation_axes, out.ablations):
    main_figure(at_seeds, [n for _, n in axis["rows"]], p.ablation_tasks, Path(path).with_suffix(""),
                labels={n: f"{axis['key']}={label}" for label, n in axis["rows"]},
                title=f"Ablation of {axis['method']}: {axis['key']}")
