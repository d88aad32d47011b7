# semalign-bench: cross-scale parametric knowledge transfer, from data to tables. A table of contents:
# configuration and input functions live in workflow/rules/common.smk, the science in the semalign package.
from snakemake.utils import min_version

min_version("8.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/semalign.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


rule all:
    input:
        final_outputs(),
