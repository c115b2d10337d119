"""lorabox's vLLM plugin (appliance/engines/vllm_plugin.py): vLLM loads it in its worker, and the
worker's cached-adapter lookups give what vLLM's own do, on vLLM's own LRU cache."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

from vllm.lora.model_manager import AdapterLRUCache, LoRAModelManager
from vllm.lora.worker_manager import WorkerLoRAManager

from appliance.engines import vllm_plugin
from tests.conftest import Server


def test_vllm_finds_the_plugin_by_its_entry_point():
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found["lorabox"] == "appliance.engines.vllm_plugin:register"


def worker_with_cache(capacity: int) -> tuple[SimpleNamespace, AdapterLRUCache[object]]:
    """What the worker's lookups read: its manager's LRU cache of adapters (vLLM's class)."""
    cache: AdapterLRUCache[object] = AdapterLRUCache(capacity, lambda _id: None)
    manager = SimpleNamespace(_registered_adapters=cache)
    manager.list_adapters = lambda: LoRAModelManager.list_adapters(manager)  # type: ignore[arg-type]
    return SimpleNamespace(_adapter_manager=manager), cache


def test_the_lookup_gives_vllms_own_set_as_the_cache_changes():
    worker, cache = worker_with_cache(capacity=1000)
    for adapter_id in range(1, 1201):  # 200 past the capacity: the oldest are evicted
        cache[adapter_id] = object()
        if adapter_id % 7 == 0:
            cache.get(adapter_id // 2)  # a use moves an adapter to the young end
    del cache[1100]
    vllms = set(LoRAModelManager.list_adapters(worker._adapter_manager))  # type: ignore[arg-type]
    assert len(vllms) == 999
    assert vllm_plugin.cached_adapter_ids(worker) == vllms


def test_registered_the_worker_answers_through_it_and_twice_is_once():
    original = WorkerLoRAManager.list_adapters
    try:
        vllm_plugin.register()
        patched = WorkerLoRAManager.list_adapters
        vllm_plugin.register()  # vLLM may load its plugins more than once in a process
        assert WorkerLoRAManager.list_adapters is patched is not original
        worker, cache = worker_with_cache(capacity=8)
        cache[3], cache[5] = object(), object()
        assert WorkerLoRAManager.list_adapters(worker) == {3, 5}  # type: ignore[arg-type]
        assert original(worker) == {3, 5}  # type: ignore[arg-type]
    finally:
        WorkerLoRAManager.list_adapters = original  # type: ignore[method-assign]


def test_the_daemons_vllm_loaded_it(server: Server):
    """The line the plugin logs where vLLM loads it in the daemon's own process (at INFO, which
    vLLM's worker does not pass on: that the worker runs it, py-spy showed, module docstring)."""
    log = server.local.log_path.read_text(errors="replace")
    assert "lorabox: vLLM plugin loaded" in log


AFTER_IMPORT = """
import sys
from appliance.engines import vllm_plugin
vllm_plugin.register()
assert vllm_plugin.TARGET not in sys.modules, "register imported vLLM's LoRA worker"
from vllm.lora.worker_manager import WorkerLoRAManager
vllm_plugin.register()  # again: one finder, one patch
finders = [f for f in sys.meta_path if isinstance(f, vllm_plugin.PatchOnImport)]
print(getattr(WorkerLoRAManager.list_adapters, vllm_plugin.PATCHED, False), len(finders))
"""


def test_in_a_process_that_has_not_imported_the_worker_it_waits_for_its_import():
    """vLLM loads its plugins in the daemon's process too: registering imports nothing of vLLM's
    (importing the LoRA worker there held the daemon's event loop 344-431 ms), and the worker's
    module is changed when a process imports it."""
    done = subprocess.run(
        [sys.executable, "-c", AFTER_IMPORT], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split() == ["True", "1"]


def test_a_vllm_whose_cache_keeps_no_order_keeps_its_own_lookups_and_says_so(monkeypatch, caplog):
    from vllm.utils.cache import LRUCache

    original = WorkerLoRAManager.list_adapters
    monkeypatch.setattr(LRUCache, "order", None)
    vllm_plugin.register()
    assert WorkerLoRAManager.list_adapters is original
    assert "this vLLM's LoRA cache keeps no key order" in caplog.text
