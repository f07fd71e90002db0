#!/usr/bin/env bash
# The GPU check of issue 11 in one go (under 8 minutes on one CUDA GPU); writes gpu_check.json (or the path in $1).
# Everything it runs and how it judges it: benchmarks/gpu_check.py. Without a GPU: `--dry-run` or `--smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python benchmarks/gpu_check.py --out "${1:-gpu_check.json}" "${@:2}"
