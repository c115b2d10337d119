"""Which weights serve a tenant's `model`: the only place that decides it.

`Catalog` answers "which model does this name mean for this tenant", so isolation is one
function to read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.versions import VersionManager
from ..engines.base import AdapterRef
from ..tenancy.store import AdapterVersion, Store, Tenant


class ModelNotFound(LookupError):
    """The name means nothing this tenant may use. Same message whether or not it exists."""

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.")
        self.model = model


@dataclass(frozen=True)
class Target:
    model: str
    adapter: AdapterVersion | None  # None: the base model

    def engine_ref(self) -> AdapterRef | None:
        return AdapterRef(self.adapter.engine_name, self.adapter.path) if self.adapter else None


class Catalog:
    def __init__(self, store: Store, versions: VersionManager, base_model_name: str):
        self.store = store
        self.versions = versions
        self.base_model_name = base_model_name

    def resolve(self, tenant: Tenant, model: str, sticky: str | None = None) -> Target:
        """`<tenant>` (active version, or the canary for its share), `<tenant>@<version>`, or base."""
        if model == self.base_model_name and tenant.allow_base_model:
            return Target(model, None)
        name, _, version = model.partition("@")
        if name != tenant.name:
            raise ModelNotFound(model)
        adapter = self.store.get_adapter(name, version) if version else self.versions.choose(name, sticky)
        if adapter is None or adapter.state != "ready":
            raise ModelNotFound(model)
        return Target(model, adapter)

    def model_ids(self, tenant: Tenant) -> list[tuple[str, str]]:
        """(model id, owner) pairs this tenant may call."""
        ready = [a for a in self.store.adapters(tenant.name) if a.state == "ready"]
        ids = [(tenant.name, tenant.name)] if self.versions.active(tenant.name) else []
        ids += [(a.label, tenant.name) for a in ready]
        if tenant.allow_base_model:
            ids.append((self.base_model_name, "lorabox"))
        return ids
