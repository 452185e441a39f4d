#!/usr/bin/env bash
# On a CUDA machine, one command within ten minutes: install, run the GPU tests, print the
# training benchmark (tiny model and a UNet of SD1.5's real shape at 256 px, caching on and off).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/python -m pip install --quiet --upgrade pip
.venv-gpu/bin/python -m pip install --quiet -e '.[dev]'
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0))"
timeout 240 .venv-gpu/bin/python -m pytest -q -m gpu || echo "gpu tests: exit $?"
timeout 300 .venv-gpu/bin/python benchmarks/train.py --steps 20 --resolution 256
