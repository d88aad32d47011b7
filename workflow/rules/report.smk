# Tables (csv, md, tex) and figures (png, pdf) from the evaluation records.


rule aggregate:
    input:
        records=eval_records(),
        manifests=list(manifests().values()),
    output:
        main=report(f"{R}/tables/main.md", caption="../report/main_table.rst", category="Tables"),
        models=report(f"{R}/tables/models.md", caption="../report/models_table.rst", category="Tables"),
        summary=f"{R}/tables/summary.csv",
    params:
        methods=METHODS,
        tasks=TASKS,
        model_names=list(manifests()),
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
    output:
        main=report(f"{R}/figures/main.png", caption="../report/main_figure.rst", category="Figures"),
    params:
        methods=METHODS,
        tasks=TASKS,
    log:
        f"{LOGS}/figures.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/figures.py"
