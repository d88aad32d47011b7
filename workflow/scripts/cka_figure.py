from pathlib import Path

from semalign.similarity import read_cka
from semalign.suite.figures import cka_figure
from semalign.suite.jobs import start_job

start_job(snakemake)
wc = snakemake.wildcards
cka_figure(read_cka(snakemake.input.before), read_cka(snakemake.input.after), Path(snakemake.output.png).with_suffix(""),
           after_label=snakemake.params.method, title=f"CKA: {wc.pair} / {wc.task}")
