from pathlib import Path

from semalign.suite.pipeline import resolve_device, run_transfer, start_job
from semalign.suite.registry import TransferContext

start_job(snakemake)
inp, wc = snakemake.input, snakemake.wildcards
out = Path(snakemake.output[0])
ctx = TransferContext(
    teacher=Path(inp.teacher).parent,
    student=Path(inp.student).parent,
    splits=Path(inp.splits).parent,
    task=wc.task,
    out_dir=out.parent,
    params=dict(snakemake.params.method_params),
    seed=int(wc.seed),
    device=resolve_device(snakemake.params.device),
    max_len=snakemake.params.max_len,
    train_on_inputs=snakemake.params.train_on_inputs,
    artifacts={k: Path(v) for k, v in inp.items() if k not in ("teacher", "student", "splits")},
)
print(run_transfer(snakemake.params.method, ctx, out, label=wc.method))
