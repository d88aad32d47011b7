from semalign.suite.contamination import write_report
from semalign.suite.jobs import start_job

start_job(snakemake)
write_report(snakemake.input.manifests, snakemake.output.csv, snakemake.output.counts, snakemake.output.md)
