"""Real-width rehearsal on CPU (issue 16.5): Llama-2-13B- and 7B-shaped models (real widths, heads, intermediate
sizes, 32000 vocabulary) with 2 layers each, random weights, bf16; one SemAlign stage, a KD step, Seeking
(sensitivity, sub-matrix, injection) and a LaTen step through the methods' own code (benchmarks/paper_scale.py).

    python -m benchmarks.rehearsal            # ~10 GB RAM, a few minutes on 2 cores
"""
import argparse
import json
from pathlib import Path

import torch

from benchmarks.paper_scale import run_all, table, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="narrow models: the code path in seconds")
    ap.add_argument("--map-rows", type=int, default=None,
                    help="aligned map from the heads' first N vocabulary rows (default: all 32000)")
    ap.add_argument("--out", type=Path, default=Path("results/rehearsal.json"))
    args = ap.parse_args()
    bench = run_all(args.layers, args.tiny, args.examples, args.tokens, "cpu", torch.bfloat16, count_flops=False,
                    map_rows=args.map_rows)
    result = write_json(bench, args.out, {"layers": args.layers, "examples": args.examples, "tokens": args.tokens,
                                          "dtype": "bfloat16", "threads": torch.get_num_threads(),
                                          "map_rows": args.map_rows})
    print(table(bench))
    print(json.dumps({"all_finite": all(s["finite"] for s in result["steps"]), "json": str(args.out)}))


if __name__ == "__main__":
    main()
