import json
from pathlib import Path

import pandas as pd

from semalign.pairing import pair_layers
from semalign.suite.ids import PairingName
from semalign.suite.io import atomic_write_text, load_manifest
from semalign.suite.jobs import start_job

start_job(snakemake)
inp, wc = snakemake.input, snakemake.wildcards
L_T, L_S = (load_manifest(Path(f).parent)["num_layers"] for f in (inp.teacher, inp.student))
name = PairingName.parse(wc.name)
scores = pd.read_csv(inp.scores).sort_values("layer")["score"].tolist() if "scores" in inp.keys() else None
cka = None
if "cka" in inp.keys():  # only the `cka` strategy: its reader's module imports torch, which no other pairing needs
    from semalign.similarity import read_cka

    cka = read_cka(inp.cka)["teacher_student"]
pairing = pair_layers(L_T, L_S, name.strategy, scores=scores, seed=snakemake.params.seed, cka=cka)
atomic_write_text(Path(snakemake.output[0]), json.dumps(pairing, indent=2))
print(pairing)
