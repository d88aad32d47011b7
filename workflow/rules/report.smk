# Tables (csv, md, tex) and figures (png, pdf) from the evaluation records.


rule aggregate:
    input:
        facts=run_facts_files(),
        records=eval_records(),
        manifests=list(manifests().values()),
        transfers=transfer_records(),
        paper=PAPER_REPORTED,
    output:
        main=report(f"{R}/tables/main.md", caption="../report/main_table.rst", category="Tables"),
        models=report(f"{R}/tables/models.md", caption="../report/models_table.rst", category="Tables"),
        cost=report(f"{R}/tables/cost.md", caption="../report/cost_table.rst", category="Tables"),
        hparams=report(f"{R}/tables/hparams.md", caption="../report/hparams_table.rst", category="Tables"),
        summary=f"{R}/tables/summary.csv",
        significance=f"{R}/tables/significance.md",
        ablation_summary=[f"{R}/tables/ablation_summary.csv"] if ablation_axes() else [],
        ablations=[
            report(path, caption="../report/ablation.rst", category="Ablations") for path in ablation_tables()
        ],
        finetuned=[
            report(path, caption="../report/finetuned_teachers.rst", category="Tables") for path in finetuned_tables()
        ],
    params:
        run_facts=run_facts_inputs(),
        ablation_axes=ablation_axes(),
        ablation_tasks=ABLATION_TASKS,
        ablation_seeds=ABLATION_SEEDS,
        reference_methods=[m for m in METHODS if method_cls(m).reference],
        methods=METHODS,
        tasks=TASKS,
        pairs=list(config["pairs"]),
        pair_sources=pair_sources(),
        finetuned_teachers=config["report"]["finetuned_teachers"],
        model_names=list(manifests()),
        method_configs=method_configs(),
        profile=config["profile"],
    log:
        f"{LOGS}/aggregate.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/aggregate.py"


rule figures:
    input:
        summary=f"{R}/tables/summary.csv",
        significance=f"{R}/tables/significance.md",
        ablation_summary=[f"{R}/tables/ablation_summary.csv"] if ablation_axes() else [],
        cost=f"{R}/tables/cost.md",
        paper=PAPER_REPORTED,
    output:
        main=report(f"{R}/figures/main.png", caption="../report/main_figure.rst", category="Figures"),
        cost_gain=report(f"{R}/figures/cost_gain.png", caption="../report/cost_gain.rst", category="Figures"),
        ablations=[report(path, caption="../report/ablation.rst", category="Ablations") for path in ablation_figures()],
        pdf=[f"{R}/figures/{name}.pdf" for name in ["main", "cost_gain"]]
        + [png.removesuffix(".png") + ".pdf" for png in ablation_figures()],
    params:
        methods=METHODS,
        tasks=TASKS,
        ablation_axes=ablation_axes(),
        ablation_tasks=ABLATION_TASKS,
        pair_sources=pair_sources(),
    log:
        f"{LOGS}/figures.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/figures.py"


rule loss_curves:
    input:
        unpack(lambda wc: {m: transfer_record(wc.pair, wc.task, m, SEEDS[0]) for m in trained_methods()}),
    output:
        png=report(f"{R}/figures/loss_curves/{{pair}}/{{task}}.png", caption="../report/loss_curves.rst", category="Training"),
        pdf=f"{R}/figures/loss_curves/{{pair}}/{{task}}.pdf",
    params:
        seed=SEEDS[0],
    log:
        f"{LOGS}/loss_curves/{{pair}}/{{task}}.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/loss_curves.py"


rule run_manifest:
    input:
        result_files(),
    output:
        report(run_manifest(), caption="../report/run_manifest.rst", category="Environment"),
    params:
        repo=workflow.basedir,
    threads: THREADS  # the torch threads it records are those every training and evaluation job got
    log:
        f"{LOGS}/run_manifest.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/run_manifest.py"
