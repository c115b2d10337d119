#!/bin/bash
# Each check is a function run through `step`, which shellcheck does not follow:
# shellcheck disable=SC2317
#
# The GPU checks of issue 23 on one NVIDIA GPU box with no package index, in under 8 minutes on one
# H100: llama.cpp built for CUDA as install.sh builds it there (this GPU's compute capability only,
# flash-attention kernels off), the llama.cpp PEFT-parity tests on the GPU, the noisy-neighbour
# benchmark fair vs FIFO on the CUDA llama.cpp engine, the residency planner and `lorabox doctor` on
# the real VRAM. Every result goes into OUT.
#
#   benchmarks/gpu_check.sh OUT                 on the GPU box, from a copy of this checkout
#   benchmarks/gpu_check.sh OUT --cpu-dry-run   anywhere: every step but the CUDA build and the GPU
#                                               assertions, with the Python and llama.cpp at hand
#   benchmarks/gpu_check.sh --bundle DIR        on a machine with the package index: what to carry
#
# What the GPU box needs carried (it has Python 3, a CUDA toolkit with nvcc, CMake, a C++ compiler
# and its own CUDA torch; vLLM's CUDA wheel and the torch it pins are too large to bring):
#   DIR/wheelhouse from `--bundle DIR`, made here with the ordinary pip client:
#     pip wheel --no-deps -w DIR/wheelhouse .                       lorabox itself
#     pip download --no-deps --only-binary :all: -d DIR/wheelhouse \
#         --python-version $PY --platform manylinux_2_28_x86_64 ... every dependency (pinned to the
#         versions installed here; torch, vLLM, triton and nvidia-* left out: the box's own serve)
#     pip download --no-deps --no-binary :all: -d DIR/wheelhouse llama-cpp-python==0.3.36  (the sdist)
#     plus what building it needs (scikit-build-core and its dependencies)
#   then copy the checkout and DIR to the GPU box and run, from the checkout:
#     LORABOX_WHEELHOUSE=DIR/wheelhouse benchmarks/gpu_check.sh OUT
#   (LORABOX_TARGET_PYTHON=3.12 when the GPU box's python3 is not this one's version.)
# Without LORABOX_WHEELHOUSE the script uses $PYTHON (default python3) as it is: it must already
# have lorabox's dependencies, pytest, pytest-asyncio, openai and matplotlib.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
LLAMACPP_VERSION=$(sed -n 's/^ *LLAMACPP_VERSION=\([0-9.]*\).*/\1/p' "$REPO/install.sh")

bundle() {
    local dir=$1 py=${PYTHON:-python3}
    local wheelhouse=$dir/wheelhouse target=${LORABOX_TARGET_PYTHON:-}
    mkdir -p "$wheelhouse"
    target=${target:-$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    "$py" -m pip wheel --no-deps -q -w "$wheelhouse" "$REPO"
    # Every distribution lorabox, the tests and the benchmarks need, at the version installed here.
    "$py" - > "$dir/requirements.txt" <<'EOF'
import importlib.metadata as md, re
skip = re.compile(r"^(torch|triton|vllm.*|nvidia-.*|llama-cpp-python|lorabox)$")
wanted, seen = ["lorabox", "pytest", "pytest-asyncio", "openai", "matplotlib", "numpy", "diskcache",
                "jinja2", "typing-extensions"], {}
while wanted:
    name = re.split(r"[ ;<>=!~\[(]", wanted.pop())[0].lower().replace("_", "-")
    if name in seen or not name:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    seen[name] = dist.version
    wanted += [r for r in dist.requires or [] if "extra ==" not in r]
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items()) if not skip.match(n)))
EOF
    "$py" -m pip download --no-deps --only-binary :all: -q -d "$wheelhouse" --python-version "$target" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 --platform any -r "$dir/requirements.txt"
    "$py" -m pip download --no-deps --no-binary :all: -q -d "$wheelhouse" "llama-cpp-python==$LLAMACPP_VERSION"
    # What building that sdist needs with no index (pip wheel --no-build-isolation): its build backend.
    "$py" -m pip download --only-binary :all: -q -d "$wheelhouse" --python-version "$target" \
        --platform manylinux_2_28_x86_64 --platform any scikit-build-core
    echo "$(find "$wheelhouse" -type f | wc -l) files, $(du -sh "$wheelhouse" | cut -f1) in $wheelhouse"
}

if [ "${1:-}" = --bundle ]; then
    bundle "${2:?usage: gpu_check.sh --bundle DIR}"
    exit 0
fi

OUT=${1:?usage: gpu_check.sh OUT [--cpu-dry-run] | --bundle DIR}
DRY=0
[ "${2:-}" = --cpu-dry-run ] && DRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/lorabox-gpu-check-XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
BEGAN=$(date +%s)
echo "step	status	seconds" > "$OUT/steps.tsv"
FAILED=0

# step NAME COMMAND...: runs it, records its status and time; a failed step does not stop the rest.
step() {
    local name=$1 began status
    shift
    began=$(date +%s)
    echo ">>> $name ($(($(date +%s) - BEGAN)) s in)"
    if "$@"; then status=ok; else status="failed ($?)"; FAILED=1; fi
    echo "$name	$status	$(($(date +%s) - began))" >> "$OUT/steps.tsv"
    echo ">>> $name: $status in $(($(date +%s) - began)) s"
}

machine() {
    { date -u; uname -a; nproc; free -g; } > "$OUT/machine.txt"
    if [ "$DRY" = 1 ]; then
        echo "cpu dry run: no GPU used" >> "$OUT/machine.txt"
        return 0
    fi
    nvidia-smi > "$OUT/nvidia-smi.txt"
    nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.used,driver_version --format=csv >> "$OUT/machine.txt"
    { command -v nvcc || echo /usr/local/cuda/bin/nvcc; } | xargs -I{} {} --version >> "$OUT/machine.txt"
}

environment() {
    PY=${PYTHON:-python3}
    if [ -z "${LORABOX_WHEELHOUSE:-}" ]; then
        echo "no LORABOX_WHEELHOUSE: using $PY as it is ($($PY -c 'import sys; print(sys.prefix)'))"
        return 0
    fi
    # --system-site-packages: the box's own CUDA torch serves the reference and the demo build.
    "$PY" -m venv --system-site-packages "$SCRATCH/venv"
    PY=$SCRATCH/venv/bin/python
    "$PY" -m pip install -q --no-index --find-links "$LORABOX_WHEELHOUSE" lorabox pytest pytest-asyncio \
        openai matplotlib scikit-build-core numpy diskcache jinja2 typing-extensions
}

build_llamacpp() {
    # install.sh's own choice of flavour and CMake flags (sourced for its functions, nothing run).
    # shellcheck disable=SC1091
    LORABOX_INSTALL_FUNCTIONS=1 . "$REPO/install.sh"
    set +u  # install.sh sets -eu; its functions read variables that may be unset
    llamacpp_flavour
    set -u
    echo "flavour $LLAMACPP_FLAVOUR: CMAKE_ARGS=\"$LLAMACPP_CMAKE_ARGS\"" | tee "$OUT/llamacpp-build.txt"
    if [ "$DRY" = 1 ]; then
        echo "cpu dry run: the CUDA build skipped; using the llama-cpp-python installed" | tee -a "$OUT/llamacpp-build.txt"
    else
        case $LLAMACPP_FLAVOUR in cuda-*) ;; *) echo "no CUDA build possible here (nvcc and a GPU needed)"; return 1 ;; esac
        local sdist
        sdist=$(ls "${LORABOX_WHEELHOUSE:?the llama-cpp-python sdist comes from the wheelhouse}"/llama_cpp_python-"$LLAMACPP_VERSION".tar.gz)
        # As install.sh: no inherited linker or compiler flags (a CUDA build with them crashed at load).
        env -u LDFLAGS -u CXXFLAGS -u CFLAGS CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" \
            CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$PY" -m pip wheel --no-deps --no-index --no-build-isolation -w "$SCRATCH/wheels" "$sdist"
        "$PY" -m pip install -q --force-reinstall --no-deps "$SCRATCH"/wheels/llama_cpp_python-*.whl
    fi
    # The build loads a model, has CUDA where it should, and links one libstdc++ (install.sh's check).
    "$PY" - "$DRY" <<'EOF' | tee -a "$OUT/llamacpp-build.txt"
import pathlib, subprocess, sys, tempfile
import llama_cpp
from appliance.demo.build import build_model
from appliance.gguf.model import write_model

gpu = bool(llama_cpp.llama_cpp.llama_supports_gpu_offload())
lib = next(pathlib.Path(llama_cpp.__file__).parent.rglob("libllama.so*"))
ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
print(f"llama-cpp-python {llama_cpp.__version__}, GPU offload: {gpu}, {lib.name} links libstdc++: {'libstdc++' in ldd}")
with tempfile.TemporaryDirectory() as scratch:
    model = pathlib.Path(scratch)
    build_model(model / "hf")
    write_model(model / "hf", model / "model.gguf", "f32")
    llama_cpp.Llama(str(model / "model.gguf"), n_ctx=64, n_gpu_layers=999 if gpu else 0, verbose=False).close()
print("loads the demo model: yes")
sys.exit(0 if gpu or sys.argv[1] == "1" else "the build has no GPU offload")
EOF
}

parity() {
    "$PY" -m pytest "$REPO/tests/test_llamacpp_outputs.py" -x -q -p no:cacheprovider \
        --junitxml="$OUT/llamacpp-parity.xml" 2>&1 | tee "$OUT/llamacpp-parity.txt"
    return "${PIPESTATUS[0]}"
}

noisy() {
    local seconds=20
    [ "$DRY" = 1 ] && seconds=8
    "$PY" -m benchmarks noisy-neighbour --engine llamacpp --runs fair,fifo --seconds "$seconds" \
        --out "$OUT/noisy-neighbour"
}

residency_and_doctor() {
    "$PY" -m appliance demo init "$SCRATCH/demo" > /dev/null
    # doctor's exit status says whether a check failed (the demo box has no systemd unit, no
    # service user): its report is the result, kept whatever the status.
    "$PY" -m appliance doctor --config "$SCRATCH/demo/lorabox.toml" > "$OUT/doctor.txt" 2>&1 || true
    cat "$OUT/doctor.txt"
    "$PY" - "$SCRATCH/demo/lorabox.toml" <<'EOF' | tee "$OUT/residency.txt"
import sys
from pathlib import Path
from appliance.adapters.drops import BaseModelInfo
from appliance.adapters.residency import lora_budget_bytes, plan
from appliance.config.settings import load_config
from appliance.daemon import plan_residency
from appliance.telemetry.gpu import gpu_memory
from appliance.tenancy.store import Store
from benchmarks.scale import llama3_8b

settings = load_config(Path(sys.argv[1]))
memory = gpu_memory()
print(f"GPU memory: {memory}")
with Store.open(settings.database_path) as store:
    model = Path(settings.model)
    print("demo box, as the daemon plans it:", plan_residency(settings, BaseModelInfo.from_model_dir(model), model, store).reason)
if memory is not None:
    free = int(memory.total * settings.gpu_memory_utilization) - 16_060_000_000
    for adapters in (20, 200, 1000):
        sizes = plan(adapters=adapters, pinned=0, base=llama3_8b(), max_rank=16, dtype_bytes=2,
                     lora_budget_bytes=lora_budget_bytes(gpu_free_bytes=free, cpu_budget_bytes=0),
                     configured_max_loras=None, configured_max_cpu_loras=None)
        print(f"Llama 3 8B bf16 on this GPU, {adapters} adapters: {sizes.reason}")
EOF
}

cd "$REPO"
export PYTHONPATH=$REPO
PY=${PYTHON:-python3}
step machine machine
step environment environment
step llamacpp-build build_llamacpp
step llamacpp-parity parity
step noisy-neighbour noisy
step residency-doctor residency_and_doctor
{
    echo "# gpu_check.sh $(date -u '+%Y-%m-%d %H:%M UTC')$([ "$DRY" = 1 ] && echo ' (cpu dry run)')"
    echo
    sed -n 2p "$OUT/machine.txt" | sed 's/^/machine: /'
    { grep -h "," "$OUT/machine.txt" || true; } | tail -n 1  # the GPU's line (none in a dry run)
    echo
    echo '| step | status | seconds |'
    echo '|---|---|---|'
    tail -n +2 "$OUT/steps.tsv" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
    echo
    echo "total: $(($(date +%s) - BEGAN)) s"
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
exit "$FAILED"
