import json
from pathlib import Path

from semalign.suite.evaluation import evaluate_model
from semalign.suite.io import atomic_write_text
from semalign.suite.jobs import start_job
from semalign.suite.pipeline import evaluated_model_dir, resolve_device

start_job(snakemake)
wc, ev = snakemake.wildcards, snakemake.params.evaluation
for seed, model, out in zip(snakemake.params.seeds, snakemake.input.models, snakemake.output, strict=True):
    result = evaluate_model(
        evaluated_model_dir(Path(model)),
        wc.task,
        Path(snakemake.input.splits).parent / "test.jsonl",
        allow_code_execution=ev["allow_code_execution"],
        batch_size=ev["batch_size"],
        gen_batch_size=ev["gen_batch_size"],
        max_gen_toks=ev["max_gen_toks"],
        chat_template=ev["chat_template"],
        device=resolve_device(snakemake.params.device),
    )
    record = {"pair": wc.pair, "method": wc.method, "seed": int(seed), **result}
    atomic_write_text(Path(out), json.dumps(record, indent=2))
    print(record)
