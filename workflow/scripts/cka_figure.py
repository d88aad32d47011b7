from pathlib import Path

from semalign.pipeline import start_job
from semalign.report import cka_figure
from semalign.similarity import read_cka

start_job(snakemake)
wc = snakemake.wildcards
cka_figure(read_cka(snakemake.input.before), read_cka(snakemake.input.after), Path(snakemake.output.png).with_suffix(""),
           after_label=snakemake.params.method, title=f"CKA: {wc.pair} / {wc.task}")
