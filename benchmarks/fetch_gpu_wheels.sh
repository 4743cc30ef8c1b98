#!/usr/bin/env bash
# Download, on a machine that reaches the package index, the wheels the GPU machine lacks, into .gpu_wheels/.
#
#     bash benchmarks/fetch_gpu_wheels.sh            # into .gpu_wheels/ (ignored by git; a few MB)
#     bash benchmarks/fetch_gpu_wheels.sh DIR        # elsewhere
#
# The GPU machine (the device tool's nvidia-h200 kind; /work/.library/device/KINDS.md) runs Python 3.12 with
# torch, torchvision, lightning, transformers, peft, torchmetrics, safetensors, tokenizers, timm, regex, tqdm,
# huggingface-hub, PyYAML, typing-extensions and pillow already installed, and reaches no package index. What
# this project needs beyond that is below, pinned to the versions the CPU venv was tested with: open_clip_torch
# (needs ftfy -> wcwidth; its other needs are there) and jsonargparse with the [signatures] extra
# (docstring-parser, typeshed-client; typeshed-client's typing-extensions is there); tiktoken, which the data
# path uses for LLaMA-3's text where it gives the Hugging Face ids (data/fast_bpe.py; without it that text goes to
# the Hugging Face tokenizer: the same ids, slower). tiktoken is a CPython 3.12 manylinux wheel (~1.2 MB; its
# regex is there, its requests is imported only to download encodings, which the project never does); the
# others are pure-Python wheels (wcwidth an abi3 one).
#
# benchmarks/gpu_check.sh installs them there with
#     python3 -m pip install --no-index --no-deps --target /tmp/gpu_site .gpu_wheels/*.whl
# and puts /tmp/gpu_site first on PYTHONPATH. Carry the folder with the device tool: carry [".gpu_wheels"].
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu_wheels}
PINS=(
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.4
  jsonargparse==4.53.0
  docstring_parser==0.18.0
  typeshed_client==2.15.0
  tiktoken==0.14.0
)
py=python3
if ! "$py" -m pip --version >/dev/null 2>&1; then py=.venv/bin/python; fi
mkdir -p "$dest"
rm -f "$dest"/*.whl "$dest"/SHA256SUMS
# --no-deps: every need is named above (pip would otherwise fetch torch and friends, which are there already).
# The GPU machine's tags: CPython 3.12 on manylinux x86-64; pure-Python wheels (py3-none-any) match any of them.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$dest" "${PINS[@]}"
count=$(ls "$dest"/*.whl | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
  echo "expected ${#PINS[@]} wheels in $dest, found $count:" >&2; ls "$dest" >&2; exit 1
fi
(cd "$dest" && sha256sum ./*.whl > SHA256SUMS)
printf '%s\n' "${PINS[@]}" > "$dest/PINS"
echo "$count wheels in $dest ($(du -sh "$dest" | cut -f1)):"
ls -l "$dest"/*.whl | awk '{printf "  %8d  %s\n", $5, $NF}'
