"""What both E2B servers share: the manager, the settings, who may call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.config.e2b import E2bConfig
from arcbox_vm.e2b.keys import AccessTokens, ApiKeys


@dataclass
class E2bContext:
    manager: Any  # SandboxManager (typed loosely: this package imports no manager internals)
    config: E2bConfig
    api_keys: ApiKeys
    tokens: AccessTokens
    network_mode: str = "tap"  # the network of sandboxes made through the E2B API
    default_egress: str = "none"  # [network] default_egress
    max_file_bytes: int = 0  # daemon.max_file_mib in bytes (0 = no limit)
    extra: dict[str, Any] = field(default_factory=dict)

    def access_token(self, sandbox_id: str) -> str | None:
        """The sandbox's envdAccessToken, None when sandboxes are not secured."""
        return self.tokens.token(sandbox_id) if self.config.secure else None

    def traffic_token(self, sandbox_id: str) -> str | None:
        """The sandbox's trafficAccessToken (its other ports), None when not secured."""
        return self.tokens.traffic_token(sandbox_id) if self.config.secure else None

    def workdir(self, sandbox_id: str) -> Path | None:
        try:
            return Path(self.manager.console_log(sandbox_id)).parent
        except Exception:  # noqa: BLE001 - gone meanwhile
            return None
