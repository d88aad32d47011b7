# lm-eval on our task YAMLs: the paper metric plus the gold-answer NLL, for every transferred model.


rule evaluate:
    input:
        model=evaluated_model,
        splits=splits_manifest("{task}"),
    output:
        eval_record("{pair}", "{task}", "{method}", "{seed}"),
    params:
        evaluation=config["evaluation"],
        device=config["device"],
    log:
        f"{LOGS}/evaluate/{{pair}}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{pair}}/{{task}}/{{method}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        **planned("evaluate"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Evaluating {wildcards.method} on {wildcards.task} ({wildcards.pair}, seed {wildcards.seed})"
    script:
        "../scripts/evaluate.py"
