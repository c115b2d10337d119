"""The drop folder on the llama.cpp engine: a new tenant, a v2 takeover, a rollback, and refusals.

The drop-folder tests of test_adapter_lifecycle.py run here again, unchanged, against the session's
llama.cpp daemon: adapters arrive as PEFT folders and are converted to GGUF on the way in. Then a
drop only this engine refuses: weights that are no numbers at all pass the header checks every
drop gets, and fail conversion, which must refuse the version with its reason.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import Server
from tests.test_adapter_lifecycle import (  # noqa: F401 (collected and run here, on llama.cpp)
    Lab,
    _refusal,
    test_broken_drops_are_refused_with_reasons_and_v1_keeps_serving,
    test_new_tenant_dropped_under_load_answers_quickly,
    test_rollback_restores_exact_v1_outputs_then_unpin,
    test_v2_takes_over_without_dropping_or_mixing,
)


@pytest.fixture(scope="module")
def lab(llamacpp_server: Server) -> Lab:
    return Lab(llamacpp_server.demo, llamacpp_server.local)


def test_adapter_that_cannot_be_converted_is_refused_and_v1_keeps_serving(lab):
    key = lab.tenant("november")
    v1 = lab.expected(lab.drop("november", "v1", seed=9601))
    lab.wait_serving(key, "november", v1)

    staged = lab.stage("november", "v2", seed=9602)
    weights = staged / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    staged.rename(staged.with_name("v2"))

    assert "not all finite numbers" in _refusal(lab, "november", "v2")
    assert lab.complete(key, "november") == v1
