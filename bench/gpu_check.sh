#!/usr/bin/env bash
# Everything that needs a CUDA device, in one command (target: under 5 minutes on an H100/H200).
#
#   here, once:        bash bench/gpu_wheels.sh          (the wheels the GPU image lacks -> .whl/)
#   on the GPU machine: bash bench/gpu_check.sh           (device tool: carry [".whl"])
#
# Runs the gpu-marked tests (every layer's forward/backward in bf16 and fp16 against fp32, save and
# load on CUDA, calibration on CUDA, the 2:4 semi-structured path, int8 through torchao), then the
# GPU benchmarks: 2:4 frozen Linear vs dense matmul (bf16, 4096+ tokens) and bench_generate.py on
# SmolLM2-135M when its offline copy is available. Output goes to stdout and, when set, to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
status=0
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ || status=$?
timeout 60 python3 bench/bench_semi_structured.py || status=$?
if python3 -c "import sys; sys.path.insert(0, 'examples'); import offline_data; offline_data.smollm2_dir()" 2>/dev/null; then
  timeout 120 python3 bench/bench_generate.py --device cuda --dtype bfloat16 --threads 0 \
    --rounds 3 --new-tokens 64 --forms dense prune50-frozen 2:4-frozen lowrank-mlp50 kronecker-mlp \
    || status=$?
else
  echo "bench_generate.py skipped: no offline SmolLM2 copy on this machine (docs/real-models.md)"
fi
echo "gpu_check: exit $status"
exit $status
