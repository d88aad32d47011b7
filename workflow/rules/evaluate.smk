# lm-eval on our task YAMLs: the paper metric plus the gold-answer NLL, for every transferred model.
# A main-table method's seeds are scored in one job: each job pays the interpreter, torch and lm-eval imports and the
# task set-up (~10 s on a laptop core) once for its models, not once per seed.

SEEDED = "|".join(re.escape(m) for m in trained_methods())


rule evaluate:
    input:
        models=evaluated_models,
        splits=splits_manifest("{task}"),
    output:
        [eval_record("{pair}", "{task}", "{method}", s) for s in SEEDS],
    params:
        seeds=eval_seeds,
        evaluation=lambda wc: {**config["evaluation"], "max_gen_toks": gen_cap(config["evaluation"]["max_gen_toks"], wc.task)},
        device=config["device"],
    log:
        f"{LOGS}/evaluate/{{pair}}/{{task}}/{{method}}/seeds.log",
    benchmark:
        f"{BENCH}/evaluate/{{pair}}/{{task}}/{{method}}/seeds.tsv"
    wildcard_constraints:
        method=SEEDED or "(?!)",
    threads: THREADS
    resources:
        **planned("evaluate"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Evaluating {wildcards.method} on {wildcards.task} ({wildcards.pair}, seeds {params.seeds})"
    script:
        "../scripts/evaluate.py"


# a reference row (one seed) or an ablation variant, one seed per job
use rule evaluate as evaluate_one with:
    output:
        eval_record("{pair}", "{task}", "{method}", "{seed}"),
    log:
        f"{LOGS}/evaluate/{{pair}}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{pair}}/{{task}}/{{method}}/seed{{seed}}.tsv"
    wildcard_constraints:
        method=".+",


ruleorder: evaluate > evaluate_one
