#!/usr/bin/env bash
# Run HERE (with internet to the package registries), once, before bench/gpu_check.sh: downloads
# the wheels that the lent GPU machine's image lacks (it has torch, transformers, accelerate,
# safetensors, peft, pytest, hypothesis, regex, rich, tqdm, pyyaml, numpy, pandas, pyarrow, but
# not pydantic, datasets, evaluate or torchao) into .whl/, which the device tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform any)
for spec in pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
  datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18 evaluate==0.4.6 torchao==0.14.1; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
ls -la .whl
