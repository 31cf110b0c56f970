"""Who may call: API keys (control plane) and per-sandbox access tokens (envd).

API keys come from `[e2b] api_keys` and `api_keys_file` (one a line, `#` comments).
A sandbox's access token (the SDK's envdAccessToken) is derived, not stored:
HMAC-SHA256 of the sandbox id under a secret kept in the data dir (0600, made on first
use), so it survives daemon restarts, `connect` can hand it out again, and nothing
secret ends up in labels or the state database. Its traffic access token (the SDK's
trafficAccessToken, for the sandbox's other ports — `get_host(port)`) is derived the same
way under another prefix: it opens those ports only, never envd.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from arcbox_vm.config.e2b import E2bConfig
from arcbox_vm.errors import ConfigError

SECRET_FILE = "e2b-token-secret"


def load_api_keys(cfg: E2bConfig) -> list[str]:
    keys = [k.strip() for k in cfg.api_keys if k.strip()]
    if cfg.api_keys_file:
        try:
            text = Path(cfg.api_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"e2b.api_keys_file: cannot read {cfg.api_keys_file}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError("[e2b] needs at least one API key (e2b.api_keys or e2b.api_keys_file); "
                          "clients send it as E2B_API_KEY")
    return keys


class ApiKeys:
    """Checks an `X-API-KEY` value against every configured key in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def check(self, value: str | None) -> bool:
        if not value:
            return False
        got = value.encode(errors="surrogateescape")
        ok = False
        for key in self._keys:  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(got, key)
        return ok


class AccessTokens:
    """envdAccessToken of each sandbox: HMAC(secret, sandbox id); trafficAccessToken:
    HMAC(secret, "traffic:" + sandbox id) (sandbox ids have no colon)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> "AccessTokens":
        path = Path(data_dir) / SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = path.read_bytes()
            if len(secret) < 32:
                raise ConfigError(f"{path} is damaged (shorter than 32 bytes); remove it "
                                  "(the access tokens of existing sandboxes change)") from None
            return cls(secret)
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        return cls(secret)

    def token(self, sandbox_id: str) -> str:
        mac = hmac.new(self._secret, sandbox_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def traffic_token(self, sandbox_id: str) -> str:
        return self.token("traffic:" + sandbox_id)

    def check(self, sandbox_id: str, value: str | None) -> bool:
        return _same(self.token(sandbox_id), value)

    def check_traffic(self, sandbox_id: str, value: str | None) -> bool:
        return _same(self.traffic_token(sandbox_id), value)


def _same(token: str, value: str | None) -> bool:
    return bool(value) and hmac.compare_digest(token.encode(), str(value).encode(errors="surrogateescape"))
