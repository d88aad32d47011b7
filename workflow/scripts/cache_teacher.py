import json
from pathlib import Path

from semalign.frontier import teacher_layers_for
from semalign.suite.cache import build_teacher_cache
from semalign.suite.io import read_jsonl
from semalign.suite.jobs import start_job
from semalign.suite.models import check_same_vocab
from semalign.suite.pipeline import resolve_device

start_job(snakemake)
teacher, student = (Path(p).parent for p in (snakemake.input.teacher, snakemake.input.student))
check_same_vocab(teacher, student)  # before any expensive work
meta = build_teacher_cache(
    teacher,
    read_jsonl(Path(snakemake.input.splits).parent / "train.jsonl"),
    layers=sorted({k for f, states in snakemake.params.layer_specs
                   for k in teacher_layers_for(json.loads(Path(f).read_text()), states)}),
    max_len=snakemake.params.max_len,
    batch_size=snakemake.params.batch_size,
    out_path=Path(snakemake.output[0]),
    device=resolve_device(snakemake.params.device),
    train_on_inputs=snakemake.params.train_on_inputs,
)
print(meta)
