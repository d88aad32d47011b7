# Models: resolve/convert once into a plain safetensors dir with a manifest; bootstrap the mini student.


rule prepare_model:
    input:
        lambda wc: local_model_files(wc.model),
    output:
        f"{R}/models/{{model}}/prepared/manifest.json",
    params:
        spec=lambda wc: model_spec(wc.model),
        seed=SEEDS[0],
    log:
        f"{LOGS}/prepare_model/{{model}}.log",
    benchmark:
        f"{BENCH}/prepare_model/{{model}}.tsv"
    resources:
        **planned("prepare_model"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Preparing model {wildcards.model}"
    script:
        "../scripts/prepare_model.py"


rule bootstrap_student:
    input:
        model=f"{R}/models/{{model}}/prepared/manifest.json",
        corpus=[str(f) for f in source_files("gsm8k", DATA_DIR)],  # GSM8K train text, its test questions banned
    output:
        f"{R}/models/{{model}}/bootstrapped/manifest.json",
    params:
        bootstrap=lambda wc: config["models"][wc.model]["bootstrap"],
        seed=SEEDS[0],
        device=config["device"],
        data_dir=str(DATA_DIR) if DATA_DIR else None,
    log:
        f"{LOGS}/bootstrap_student/{{model}}.log",
    benchmark:
        f"{BENCH}/bootstrap_student/{{model}}.tsv"
    threads: THREADS  # on two cores one thread beats two: the teacher-side jobs (evaluations, attribution, bases) fill the other
    priority: 10  # every student-side job waits for it: started before the teacher-side jobs
    conda:
        "../envs/semalign.yaml"
    message:
        "Bootstrapping student {wildcards.model} (bounded offline pretraining)"
    script:
        "../scripts/bootstrap_student.py"
