# semalign-bench: cross-scale parametric knowledge transfer, from data to tables. A table of contents:
# input functions live in workflow/rules/common.smk (the config checks in semalign/suite/config.py), the science in
# the semalign and baselines packages. Profiles overlay config/base.yaml; without --configfile the default profile is mini.
from pathlib import Path

from snakemake.utils import min_version

min_version("8.0")


configfile: Path(workflow.basedir, "config", "base.yaml")


if not workflow.overwrite_configfiles:  # the default profile; --config key=value still applies on top

    configfile: Path(workflow.basedir, "config", "mini.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/semalign.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


# A method's own artifacts: one rule each, one file per method (see the README, "Add a baseline").
for method_rules in sorted(Path(workflow.basedir, "workflow", "rules", "methods").glob("*.smk")):

    include: method_rules


rule all:
    input:
        final_outputs(),
