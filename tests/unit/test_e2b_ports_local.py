"""The REAL `e2b` SDK against the in-process daemon over the local VMM double (see
test_e2b_local.py): `get_host(port)` through E2B_SANDBOX_URL — HTTP proxied to a server
in the "guest" (this host: it listens on 127.0.0.1 only) over the agent's port channel —
and create's `allow_internet_access` / `network` as the sandbox's egress policy (a fake
network adapter stands in for TAPs: no rule is made, no packet sent)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

e2b = pytest.importorskip("e2b")
httpx = pytest.importorskip("httpx")

from e2b import AsyncSandbox  # noqa: E402
from e2b.envd.api import handle_envd_api_exception  # noqa: E402
from e2b.exceptions import SandboxException, SandboxUnreachableException  # noqa: E402
from e2b.sandbox.network import ALL_TRAFFIC  # noqa: E402

from arcbox_vm.config import LimitsConfig  # noqa: E402
from arcbox_vm.ports.network import EgressPolicy, NetworkLease  # noqa: E402
from tests.unit.test_e2b_local import E2bDaemon, e2b_daemon, free_port  # noqa: E402

ECHO = Path(__file__).resolve().parents[1] / "support" / "http_echo.py"
MAX_CONNECTIONS = 3


async def start_server(sbx: AsyncSandbox, cmd: str, port: int, daemon: E2bDaemon) -> None:
    """Run `cmd` in the background in the sandbox, wait until `port` answers through the proxy."""
    await sbx.commands.run(cmd, background=True)
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            r = await client.get(f"http://{daemon.sandbox}/", headers=port_headers(sbx, port))
            if r.status_code != 502:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {r.text}")


def port_headers(sbx: AsyncSandbox, port: int) -> dict[str, str]:
    """What reaches `port` of the sandbox through E2B_SANDBOX_URL: the SDK's routing
    headers and the sandbox's traffic access token."""
    assert sbx.traffic_access_token
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port),
            "E2b-Traffic-Access-Token": sbx.traffic_access_token}


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[E2bDaemon]:
    async with e2b_daemon(tmp_path, monkeypatch, limits=LimitsConfig(max_port_connections=MAX_CONNECTIONS)) as d:
        yield d


@pytest_asyncio.fixture
async def sandbox(daemon: E2bDaemon, tmp_path: Path) -> AsyncIterator[AsyncSandbox]:
    (tmp_path / "home").mkdir()  # the "guest" is this host: its login shells must not read our profile
    sbx = await AsyncSandbox.create(timeout=120, envs={"HOME": str(tmp_path / "home")})
    try:
        yield sbx
    finally:
        await sbx.kill()


async def test_get_host_reaches_an_http_server_in_the_sandbox(daemon: E2bDaemon, sandbox: AsyncSandbox,
                                                              tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from the guest\n")
    blob = os.urandom(3 << 20)  # > the port channel's window: flow control both ways
    (site / "blob.bin").write_bytes(blob)
    port = free_port()
    await start_server(sandbox, f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {site}",
                       port, daemon)
    base = f"http://{daemon.sandbox}"
    host = sandbox.get_host(port)
    assert host.startswith(f"{port}-{sandbox.sandbox_id}.")
    async with httpx.AsyncClient() as client:
        # the routing headers (what the SDK sends through E2B_SANDBOX_URL)
        r = await client.get(f"{base}/hello.txt", headers=port_headers(sandbox, port))
        assert (r.status_code, r.text) == (200, "hello from the guest\n")
        assert r.headers["content-length"] == str(len("hello from the guest\n"))
        # the get_host(port) name as Host: routed on it alone
        token = {"E2b-Traffic-Access-Token": sandbox.traffic_access_token}
        r = await client.get(f"{base}/hello.txt", headers={"Host": host, **token})
        assert (r.status_code, r.text) == (200, "hello from the guest\n")
        r = await client.get(f"{base}/blob.bin", headers={"Host": host, **token})
        assert r.status_code == 200 and r.content == blob
        r = await client.head(f"{base}/blob.bin", headers=port_headers(sandbox, port))
        assert (r.status_code, r.headers["content-length"], r.content) == (200, str(len(blob)), b"")
        r = await client.get(f"{base}/missing", headers=port_headers(sandbox, port))
        assert r.status_code == 404  # the guest server's answer, passed through

        # the envd token opens the sandbox's ports too; none, or another sandbox's, does not
        hdr = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(port)}
        r = await client.get(f"{base}/hello.txt", headers={**hdr, "X-Access-Token": sandbox._envd_access_token})
        assert r.status_code == 200
        assert (await client.get(f"{base}/hello.txt", headers=hdr)).status_code == 401
        r = await client.get(f"{base}/hello.txt", headers={**hdr, "E2b-Traffic-Access-Token": "x" * 43})
        assert r.status_code == 401 and "E2b-Traffic-Access-Token" in r.json()["message"]
        # ... and the traffic token does not open envd
        r = await client.get(f"{base}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, **token})
        assert r.status_code == 401

        # nothing listens: 502, which the SDK reads as "port is not open"
        closed = free_port()
        r = await client.get(f"{base}/", headers=port_headers(sandbox, closed))
        assert r.status_code == 502 and r.json()["port"] == closed
        err = handle_envd_api_exception(r)
        assert isinstance(err, SandboxUnreachableException) and "port is not open" in str(err)
        r = await client.get(f"{base}/", headers={**port_headers(sandbox, port), "Upgrade": "websocket",
                                                  "Connection": "Upgrade"})
        assert r.status_code == 501 and "WebSocket" in r.json()["message"]
        r = await client.get(f"{base}/", headers={**port_headers(sandbox, port), "E2b-Sandbox-Port": "70000"})
        assert r.status_code == 400

    await sandbox.kill()
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{base}/hello.txt", headers=port_headers(sandbox, port))
        assert r.status_code == 502 and "was not found" in r.json()["message"]


async def test_bodies_headers_and_the_connection_limit(daemon: E2bDaemon, sandbox: AsyncSandbox) -> None:
    port = free_port()
    await start_server(sandbox, f"{sys.executable} {ECHO} {port}", port, daemon)
    url = f"http://{daemon.sandbox}"
    hdr = port_headers(sandbox, port)
    async with httpx.AsyncClient(timeout=30) as client:
        body = os.urandom((2 << 20) + 123)
        r = await client.post(f"{url}/echo?a=1&b=%20", content=body,
                              headers={**hdr, "X-Custom": "kept", "Keep-Alive": "timeout=5",
                                       "Connection": "keep-alive, X-Hop", "X-Hop": "dropped",
                                       "X-Access-Token": sandbox._envd_access_token})
        assert r.status_code == 200 and r.headers["x-echo"] == "yes"
        got = r.json()
        assert (got["method"], got["target"], got["length"]) == ("POST", "/echo?a=1&b=%20", len(body))
        assert got["sha256"] == hashlib.sha256(body).hexdigest()
        seen = dict(got["headers"])
        assert seen["x-custom"] == "kept" and seen["connection"] == "close"
        assert seen["host"] == daemon.sandbox  # the client's Host passes through
        for private in ("e2b-sandbox-id", "e2b-sandbox-port", "e2b-traffic-access-token", "x-access-token",
                        "keep-alive", "x-hop"):
            assert private not in seen, private

        async def chunks() -> AsyncIterator[bytes]:  # no length: chunked in, chunked again to the guest
            for i in range(40):
                yield bytes([i]) * 50_000

        r = await client.put(f"{url}/echo", content=chunks(), headers=hdr)
        got = r.json()
        assert got["length"] == 40 * 50_000 and dict(got["headers"])["transfer-encoding"] == "chunked"
        assert got["sha256"] == hashlib.sha256(b"".join(bytes([i]) * 50_000 for i in range(40))).hexdigest()

        r = await client.get(f"{url}/bytes?n=1500000", headers=hdr)  # chunked, no length
        assert r.status_code == 200 and r.content == b"x" * 1_500_000
        r = await client.get(f"{url}/reset", headers=hdr)  # closed without an answer
        assert r.status_code == 502 and "without answering" in r.json()["message"]
        with pytest.raises(httpx.RemoteProtocolError):  # broke off mid-response: the client's connection is dropped
            await client.get(f"{url}/truncate", headers=hdr)
        r = await client.get(f"{url}/echo", headers=hdr)
        assert r.status_code == 200

        # [limits] max_port_connections counts these streams: one more waits for room (503)
        slow = [asyncio.create_task(client.get(f"{url}/slow?s=3", headers=hdr)) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(1.0)
        r = await client.get(f"{url}/echo", headers=hdr)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "max_port_connections" in r.json()["message"]
        assert all(t.status_code == 200 for t in await asyncio.gather(*slow))

    # clients that leave in the middle of a response give their connection back
    for _ in range(MAX_CONNECTIONS):
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", f"{url}/bytes?n=50000000", headers=hdr) as r:
                async for _chunk in r.aiter_raw():
                    break
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            r = await client.get(f"{url}/echo", headers=hdr)
            if r.status_code != 503:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200


# -- allow_internet_access / network: the egress policy ---------------------------------------


class FakeNetwork:
    """The Network port without TAPs or rules: leases from a counter, policies recorded."""

    netns = ""

    class Pool:
        def reserve(self, ip: str, owner: str) -> None: ...

        def release(self, ip: str) -> None: ...

    def __init__(self) -> None:
        self.pool = self.Pool()
        self.policies: dict[str, EgressPolicy | None] = {}  # by TAP name
        self._n = 0

    async def start(self, keep_taps: set[str] = set(), adopted: object = ()) -> None:  # noqa: B006
        pass

    async def allocate(self, owner: str, policy: EgressPolicy | None = None) -> NetworkLease:
        self._n += 1
        lease = NetworkLease(f"10.77.0.{self._n + 1}", "10.77.0.1", "255.255.255.0", f"fake{self._n}",
                             f"06:00:00:00:00:{self._n:02x}", ())
        self.policies[lease.tap_name] = policy
        return lease

    async def set_policy(self, lease: NetworkLease, policy: EgressPolicy | None) -> None:
        self.policies[lease.tap_name] = policy

    async def release(self, lease: NetworkLease) -> None:
        self.policies.pop(lease.tap_name, None)

    async def release_orphan(self, lease: NetworkLease) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest_asyncio.fixture
async def tap_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[E2bDaemon]:
    async with e2b_daemon(tmp_path, monkeypatch, network=FakeNetwork()) as d:
        yield d


def applied(daemon: E2bDaemon, sandbox_id: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The sandbox's policy as the manager reports it, checked against what the network got."""
    assert daemon.manager is not None
    net = daemon.manager.inspect_sandbox(sandbox_id).network
    assert net is not None
    policy = daemon.network.policies[net.tap_name]  # type: ignore[attr-defined]
    assert policy == EgressPolicy(net.egress, net.allow_out, net.deny_out)  # type: ignore[arg-type]
    return net.egress, net.allow_out, net.deny_out


async def test_internet_access_and_network_become_the_egress_policy(tap_daemon: E2bDaemon) -> None:
    made: list[AsyncSandbox] = []

    async def create(**kw: object) -> AsyncSandbox:
        made.append(await AsyncSandbox.create(timeout=60, **kw))  # type: ignore[arg-type]
        return made[-1]

    try:
        sbx = await create(allow_internet_access=False, network={"allow_out": ["1.1.1.1", "8.8.8.0/24"]})
        assert applied(tap_daemon, sbx.sandbox_id) == ("none", ("1.1.1.1/32", "8.8.8.0/24"), ())
        info = await sbx.get_info()
        assert info.allow_internet_access is False
        assert info.network == {"allow_out": ["1.1.1.1/32", "8.8.8.0/24"], "deny_out": [ALL_TRAFFIC]}

        # E2B's "only these": allow_out with everything denied (its allow wins over its deny)
        sbx = await create(network={"allow_out": ["9.9.9.9"], "deny_out": lambda ctx: [ctx.all_traffic]})
        assert applied(tap_daemon, sbx.sandbox_id) == ("none", ("9.9.9.9/32",), ())

        # internet, less a range, but one address in it allowed after all
        sbx = await create(allow_internet_access=True, network={"deny_out": ["8.8.0.0/16"], "allow_out": ["8.8.8.8"]})
        egress, allow, deny = applied(tap_daemon, sbx.sandbox_id)
        assert (egress, allow) == ("nat", ("8.8.8.8/32",))
        nets = [ipaddress.ip_network(d) for d in deny]
        assert not any(ipaddress.ip_address("8.8.8.8") in n for n in nets)
        assert any(ipaddress.ip_address("8.8.4.4") in n for n in nets)
        assert sum(n.num_addresses for n in nets) == 65535
        info = await sbx.get_info()
        assert info.allow_internet_access is True and info.network["allow_out"] == ["8.8.8.8/32"]

        # nothing said: the daemon's [network] default_egress ("none")
        sbx = await create()
        assert applied(tap_daemon, sbx.sandbox_id) == ("none", (), ())

        # update_network replaces the whole policy (E2B: what is left out is cleared)
        await sbx.update_network({"allow_internet_access": True, "deny_out": ["1.0.0.0/8"]})
        assert applied(tap_daemon, sbx.sandbox_id) == ("nat", (), ("1.0.0.0/8",))
        await sbx.update_network({"allow_out": ["1.1.1.1"]})
        assert applied(tap_daemon, sbx.sandbox_id) == ("none", ("1.1.1.1/32",), ())

        with pytest.raises(SandboxException, match="domain names"):
            await create(network={"allow_out": ["example.com"]})
        with pytest.raises(SandboxException, match="egressProxy"):
            await create(network={"egress_proxy": {"address": "proxy.example.com:1080"}})
        with pytest.raises(SandboxException, match="allowPublicTraffic"):
            await create(network={"allow_public_traffic": True})
        with pytest.raises(SandboxException, match="domain names"):
            await sbx.update_network({"allow_out": ["*.example.com"]})
        assert applied(tap_daemon, sbx.sandbox_id) == ("none", ("1.1.1.1/32",), ()), "unchanged"
    finally:
        for s in made:
            await s.kill()
    assert tap_daemon.network.policies == {}  # type: ignore[attr-defined]


async def test_without_a_tap_there_is_no_egress_to_ask_for(daemon: E2bDaemon) -> None:
    with pytest.raises(SandboxException, match="no network"):
        await AsyncSandbox.create(timeout=60, allow_internet_access=True)
    with pytest.raises(SandboxException, match="no network"):
        await AsyncSandbox.create(timeout=60, network={"allow_out": ["1.1.1.1"]})
    sbx = await AsyncSandbox.create(timeout=60, allow_internet_access=False, network={"deny_out": ["1.1.1.1"]})
    try:
        info = await sbx.get_info()
        assert info.allow_internet_access is False and info.network == {"deny_out": [ALL_TRAFFIC]}
        assert daemon.manager is not None and daemon.manager.inspect_sandbox(sbx.sandbox_id).network is None
        with pytest.raises(SandboxException, match="no network"):
            await sbx.update_network({"allow_internet_access": True})
    finally:
        await sbx.kill()
