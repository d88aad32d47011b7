from pathlib import Path

from semalign.similarity import cka_report
from semalign.suite.io import read_jsonl
from semalign.suite.jobs import start_job
from semalign.suite.pipeline import evaluated_model_dir, resolve_device

start_job(snakemake)
p, inp = snakemake.params, snakemake.input
cka_report(
    Path(inp.teacher).parent,
    evaluated_model_dir(Path(inp.student)),
    read_jsonl(Path(inp.splits).parent / f"{p.split}.jsonl"),
    p.max_len,
    Path(snakemake.output[0]),
    max_tokens=p.max_tokens,
    batch_size=p.batch_size,
    seed=p.seed,
    device=resolve_device(p.device),
)
