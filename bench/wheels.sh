#!/usr/bin/env bash
# The wheels the GPU machine lacks, downloaded here into .whl (git-ignored; `run` carries it: carry [".whl"]).
# The machine has torch 2.11, tokenizers, huggingface-hub, httpx, psutil, prometheus-client, jinja2, werkzeug,
# click and pytest; these are the benchmark's and the GPU tests' other imports, at requirements.lock's versions
# (torchao at the one the FP8 code is written for). About 58 MiB: with the repository under the 64 MiB a call takes.
#   bash bench/wheels.sh            then   run(command="bash bench/h200.sh ...", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pins=(diffusers==0.42.1 transformers==5.23.0 torchao==0.17.0 av==18.1.0 flask==3.1.3 blinker==1.9.0
      itsdangerous==2.2.0 ftfy==6.3.1 wcwidth==0.9.4 tenacity==9.2.1 python-json-logger==4.2.0 redis==8.1.0
      upstash-redis==1.8.0 gunicorn==27.0.1)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
du -sh .whl
