import json
from pathlib import Path

import pandas as pd

from semalign.pairing import pair_layers
from semalign.similarity import read_cka
from semalign.suite.ids import PairingName
from semalign.suite.io import atomic_write_text
from semalign.suite.jobs import start_job
from semalign.suite.models import load_manifest

start_job(snakemake)
inp, wc = snakemake.input, snakemake.wildcards
L_T, L_S = (load_manifest(Path(f).parent)["num_layers"] for f in (inp.teacher, inp.student))
name = PairingName.parse(wc.name)
scores = pd.read_csv(inp.scores).sort_values("layer")["score"].tolist() if "scores" in inp.keys() else None
cka = read_cka(inp.cka)["teacher_student"] if "cka" in inp.keys() else None
pairing = pair_layers(L_T, L_S, name.strategy, scores=scores, seed=snakemake.params.seed, cka=cka)
atomic_write_text(Path(snakemake.output[0]), json.dumps(pairing, indent=2))
print(pairing)
