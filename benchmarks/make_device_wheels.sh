#!/usr/bin/env bash
# Build .whl/: the packages lowbit needs that the lent GPU machine lacks (its image has torch, numpy,
# opencv, scipy, rich, typer...; not ModelOpt, Ultralytics, pydantic, PuLP, pycocotools), for its Python 3.12, at the
# versions constraints.txt pins. About 9 MB: PuLP's wheel bundles CBC for six platforms (16 MB), so it is
# repacked with the Linux x86-64 solver only; the device's 64 MiB carry is shared with images.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(pin nvidia-modelopt)" "$(pin ultralytics)" "$(pin ultralytics-thop)" "$(pin pydantic)" "$(pin pydantic_core)" \
  "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin pycocotools)" "$(pin typing_extensions)" "$(pin omegaconf)" "$(pin PuLP)"
python3 - <<'EOF'
import glob, os, zipfile
src = glob.glob(".whl/pulp-*.whl")[0]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if "/solverdir/cbc/" in item.filename and "/linux/i64/" not in item.filename:
            continue
        zout.writestr(item, zin.read(item.filename))
os.replace(tmp, src)
EOF
du -sh .whl
