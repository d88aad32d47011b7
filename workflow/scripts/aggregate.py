import json
from pathlib import Path

from semalign.suite.jobs import start_job
from semalign.suite.paper import load_paper_reported, match_reported
from semalign.suite.stats import load_items, paired_tests
from semalign.suite.tables import (
    ablation_table,
    cost_table,
    finetuned_teachers_table,
    hparam_table,
    load_records,
    main_table,
    model_table,
    run_facts,
    summarise,
    write_table,
)

start_job(snakemake)
p, inp, out = snakemake.params, snakemake.input, snakemake.output
evals = load_records(inp.records)
summary = summarise(evals)
summary.to_csv(out.summary, index=False)
scale = "" if p.profile == "paper" else f" — small-scale profile '{p.profile}', not comparable to the paper's numbers"
paper = match_reported(load_paper_reported(inp.paper), p.pair_sources)
# paired tests per test item of every trained method against the untouched student and KD (Holm over the pair)
tests = paired_tests(load_items(inp.records), [m for m in p.methods if m not in p.reference_methods])
write_table(tests, Path(out.significance).with_suffix(""),
            f"Paired tests per test item vs the untouched student and KD (sign/McNemar on the metric, Wilcoxon on "
            f"NLL; p_holm: Holm over each pair's tests){scale}")
write_table(main_table(summary, p.methods, p.tasks, paper, tests), Path(out.main).with_suffix(""),
            f"Main results (p: paired tests per item, Holm-adjusted, * < 0.05){scale}")
if p.finetuned_teachers:
    write_table(finetuned_teachers_table(summary, p.finetuned_teachers, p.methods, paper),
                Path(out.finetuned[0]).with_suffix(""), f"Transfer from fine-tuned teachers (paper's Table 2){scale}")
models = model_table(dict(zip(p.model_names, inp.manifests)))
write_table(models, Path(out.models).with_suffix(""), f"Models ({p.profile})")

runs = {(pair, task): run_facts(**facts) for pair, tasks in p.run_facts.items() for task, facts in tasks.items()}
# transfer/<pair>/<task>/<method>/seed<k>/transfer.json: the record knows its task, the path its pair
records = [{**json.loads(Path(f).read_text()), "pair": Path(f).parts[-5]} for f in inp.transfers]
write_table(cost_table(records, runs), Path(out.cost).with_suffix(""), f"Transfer cost ({p.profile})")
write_table(hparam_table(p.method_configs), Path(out.hparams).with_suffix(""), f"Hyperparameters ({p.profile})")
if p.ablation_axes:
    # every ablation row (the reference too) at the ablation seeds; reference rows (teacher, student) run once
    at_seeds = summarise(evals[evals.seed.isin(p.ablation_seeds) | evals.method.isin(p.reference_methods)])
    at_seeds.to_csv(out.ablation_summary[0], index=False)
    seeds = f", seeds {', '.join(map(str, p.ablation_seeds))}"
    for axis, path in zip(p.ablation_axes, out.ablations):
        write_table(ablation_table(at_seeds, axis["rows"], p.ablation_tasks, axis["key"]), Path(path).with_suffix(""),
                    f"Ablation of {axis['method']}: {axis['key']}{seeds}{scale}")
