"""One GPU check (issue 16.6), at most 8 minutes on one H100/H200: the real-width pair (Llama-2-13B / 7B widths,
32000 vocabulary) with 4 layers each, in bf16; times a SemAlign stage, a KD step, Seeking's sensitivity pass and a
LaTen step through the methods' own code (benchmarks/paper_scale.py) and writes per step the wall time, tokens/s,
peak memory and MFU (FLOPs counted by torch over the card's bf16 dense peak) to a JSON.

    python -m benchmarks.gpu_check                          # on the GPU machine
    python -m benchmarks.gpu_check --device cpu --tiny      # the same code path in seconds (tests)
"""
import argparse
import json
from pathlib import Path

import torch

from benchmarks.paper_scale import run_all, table, write_json


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="narrow models (CPU tests)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; use --device cpu --tiny for the CPU code path")
    bench = run_all(args.layers, args.tiny, args.examples, args.tokens, args.device, torch.bfloat16,
                    count_flops=True, methods=("semalign", "kd", "seeking", "laten"))
    result = write_json(bench, args.out, {"layers": args.layers, "examples": args.examples, "tokens": args.tokens,
                                          "dtype": "bfloat16", "tiny": args.tiny})
    print(table(bench))
    print(json.dumps({"all_finite": all(s["finite"] for s in result["steps"]), "json": str(args.out)}))
    return result


if __name__ == "__main__":
    main()
