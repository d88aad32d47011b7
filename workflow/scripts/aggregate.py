from pathlib import Path

from semalign.pipeline import start_job
from semalign.report import load_records, main_table, model_table, summarise, write_table

start_job(snakemake)
p = snakemake.params
summary = summarise(load_records(snakemake.input.records))
summary.to_csv(snakemake.output.summary, index=False)
scale = "" if p.profile == "paper" else f" — small-scale profile '{p.profile}', not comparable to the paper's numbers"
write_table(main_table(summary, p.methods, p.tasks), Path(snakemake.output.main).with_suffix(""), f"Main results{scale}")
models = model_table(dict(zip(p.model_names, snakemake.input.manifests)))
write_table(models, Path(snakemake.output.models).with_suffix(""), f"Models ({p.profile})")
