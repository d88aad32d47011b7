# SemAlign's analysis stages: semantic-basis validation (paper Fig. 2), layer attribution, layer pairing.


rule semantic_bases:
    input:
        model=lambda wc: model_manifest(wc.model),
        splits=expand(f"{R}/splits/{{task}}/manifest.json", task=TASKS),
    output:
        csv=f"{R}/bases/{{model}}/decomposition.csv",
        png=report(f"{R}/bases/{{model}}/decomposition.png", caption="../report/decomposition.rst", category="Semantic bases"),
        pdf=f"{R}/bases/{{model}}/decomposition.pdf",
    params:
        per_task=config["analysis"]["examples_per_task"],
        max_len=config["data"]["max_len"],
        seed=config["data"]["seed"],
    resources:
        **planned("semantic_bases"),
    log:
        f"{LOGS}/semantic_bases/{{model}}.log",
    benchmark:
        f"{BENCH}/semantic_bases/{{model}}.tsv"
    threads: THREADS
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/semantic_bases.py"


rule aligned_map:
    input:
        teacher=pair_model("teacher"),
        student=pair_model("student"),
    output:
        AlignedMap.pattern(R),
    wildcard_constraints:
        lens=_alternatives(AlignedMap.LENSES),
    resources:
        **planned("aligned_map"),
    log:
        f"{LOGS}/aligned_map/{{pair}}_{{lens}}.log",
    benchmark:
        f"{BENCH}/aligned_map/{{pair}}_{{lens}}.tsv"
    threads: THREADS
    conda:
        "../envs/semalign.yaml"
    message:
        "Aligned semantic map M = S_S S_T^T for {wildcards.pair}, final norm's gamma {wildcards.lens}"
    script:
        "../scripts/aligned_map.py"


rule attribution:
    input:
        teacher=pair_model("teacher"),
        splits=f"{R}/splits/{{task}}/manifest.json",
    output:
        csv=f"{R}/attribution/{{pair}}/{{task}}/{{attribution}}.csv",
        png=report(f"{R}/attribution/{{pair}}/{{task}}/{{attribution}}.png", caption="../report/attribution.rst", category="Attribution"),
        pdf=f"{R}/attribution/{{pair}}/{{task}}/{{attribution}}.pdf",
    params:
        max_len=config["data"]["max_len"],
        batch_size=config["cache"]["batch_size"],
        seed=config["data"]["seed"],
        device=config["device"],
    wildcard_constraints:
        attribution=_alternatives(ATTRIBUTION_METHODS),
    log:
        f"{LOGS}/attribution/{{pair}}/{{task}}/{{attribution}}.log",
    benchmark:
        f"{BENCH}/attribution/{{pair}}/{{task}}/{{attribution}}.tsv"
    threads: THREADS
    resources:
        **planned("attribution"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Layer attribution ({wildcards.attribution}) of the teacher: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/attribution.py"


rule pairing:
    input:
        unpack(pairing_inputs),
    output:
        Pairing.pattern(R),
    params:
        seed=config["data"]["seed"],
    wildcard_constraints:
        name=rf"({_alternatives(STRATEGIES)})(-({_alternatives(ATTRIBUTION_METHODS)}))?",
    log:
        f"{LOGS}/pairing/{{pair}}/{{task}}/{{name}}.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/pairing.py"


# Linear CKA of a student's layers with the teacher's and with its own (paper Figs. 4-5), on a transfer split.
# method `none` is the untouched student (input of the `cka` pairing); a trained method's first-seed student.
rule cka:
    input:
        teacher=pair_model("teacher"),
        student=cka_student,
        splits=f"{R}/splits/{{task}}/manifest.json",
    output:
        f"{R}/cka/{{pair}}/{{task}}/{{method}}.csv",
    params:
        split=config["analysis"]["cka_split"],
        max_tokens=config["analysis"]["cka_max_tokens"],
        max_len=config["data"]["max_len"],
        batch_size=config["cache"]["batch_size"],
        seed=config["data"]["seed"],
        device=config["device"],
    log:
        f"{LOGS}/cka/{{pair}}/{{task}}/{{method}}.log",
    benchmark:
        f"{BENCH}/cka/{{pair}}/{{task}}/{{method}}.tsv"
    threads: THREADS
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../envs/semalign.yaml"
    message:
        "CKA of the {wildcards.method} student with the teacher and itself: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/cka.py"


# Paper Figs. 4-5: the CKA heatmaps before (untouched student) and after transfer (`analysis.cka_method`).
rule cka_figure:
    input:
        before=f"{R}/cka/{{pair}}/{{task}}/none.csv",
        after=f"{R}/cka/{{pair}}/{{task}}/{config['analysis']['cka_method']}.csv",
    output:
        png=report(f"{R}/figures/cka_{{pair}}_{{task}}.png", caption="../report/cka.rst", category="CKA"),
        pdf=f"{R}/figures/cka_{{pair}}_{{task}}.pdf",
    params:
        method=config["analysis"]["cka_method"],
    wildcard_constraints:
        pair="|".join(map(re.escape, config["pairs"])),
        task="|".join(TASKS),
    log:
        f"{LOGS}/cka_figure/{{pair}}/{{task}}.log",
    conda:
        "../envs/semalign.yaml"
    message:
        "CKA figure: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/cka_figure.py"
