# Sourced at the start of every run on the lent GPU machine: lowbit's missing packages from carried
# wheels (.whl), lowbit itself from the checkout, caches and outputs inside the run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LOWBIT_CACHE=/tmp/lowbit-cache
export OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, modelopt, ultralytics; print('torch', torch.__version__, 'modelopt', modelopt.__version__, 'ultralytics', ultralytics.__version__)"
