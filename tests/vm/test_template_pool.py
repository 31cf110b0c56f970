"""A template's warm pool on real VMs (`[pool.templates]`): the template is built after
the manager started (the pool picks it up), `create --template` hands out a READY
sandbox whose app answers on the first exec, the pool refills, and closing the manager
leaves nothing but the template."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxSpec, TemplateBuildSpec
from arcbox_vm.models import SandboxState

from .manager_helpers import fresh_netns_name, make_config

pytestmark = pytest.mark.vm

APP = ("import http.server, os\nclass H(http.server.BaseHTTPRequestHandler):\n"
       "    def do_GET(self):\n        body = os.environ['GREETING'].encode()\n        self.send_response(200)\n"
       "        self.send_header('Content-Length', str(len(body)))\n        self.end_headers()\n"
       "        self.wfile.write(body)\n    def log_message(self, *a):\n        pass\n"
       "http.server.ThreadingHTTPServer(('127.0.0.1', 8080), H).serve_forever()\n")
FETCH = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/', timeout=5).read().decode())"
DOCKERFILE = f'''FROM arcbox:base
ENV GREETING=hello
WORKDIR /app
COPY app.py ./
START ["python3", "app.py"]
READY ["python3", "-c", "{FETCH}"]
'''


@pytest.fixture
def netns():
    ns = fresh_netns_name()
    assert subprocess.run(["ip", "netns", "add", ns], check=False).returncode == 0
    yield ns
    subprocess.run(["ip", "netns", "del", ns], check=False)


async def full(mgr: SandboxManager, name: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (p := mgr.template_pool(name)) is None or p.ready() < n:
        assert time.monotonic() < deadline, f"the pool of {name} did not fill"
        await asyncio.sleep(0.05)


async def fetch(mgr: SandboxManager, sid: str) -> str:
    out, err, code = await (await mgr.run_in_sandbox(sid, ["python3", "-c", FETCH], timeout_seconds=60)).collect()
    assert code == 0, (out, err)
    return out.decode().strip()


async def test_a_template_pool_of_one_hands_out_a_serving_sandbox_and_refills(backend, guest_image, tmp_path,
                                                                              netns):
    cfg = make_config(backend, guest_image, tmp_path / "data", cidr="10.235.0.0/24", netns=netns)
    cfg.pool.templates = {"webpool": 1}
    ctx = Path(tmp_path / "ctx")
    ctx.mkdir()
    (ctx / "app.py").write_text(APP)
    mgr = SandboxManager(cfg)
    try:
        await mgr.start()
        await mgr.build_template(TemplateBuildSpec("webpool", DOCKERFILE, ctx, network="none"))
        await full(mgr, "webpool", 1, 120)
        handout, answer = [], []
        for i in range(5):
            t0 = time.perf_counter()
            sid, _ = await mgr.create_sandbox(SandboxSpec(template="webpool", labels={"n": str(i)},
                                                          env={"GREETING": f"hi-{i}"}))
            took = time.perf_counter() - t0
            info = mgr.inspect_sandbox(sid)
            assert info.state == SandboxState.READY and took < 0.05, f"hand-out took {took * 1000:.1f} ms"
            assert info.labels == {"arcbox.template": "webpool", "n": str(i)}
            assert await fetch(mgr, sid) == "hello", "the app answers on the first exec (its env is the template's)"
            answer.append(time.perf_counter() - t0)
            handout.append(took)
            out, _, _ = await (await mgr.run_in_sandbox(sid, ["sh", "-c", "echo $GREETING; hostname; pwd"])).collect()
            assert out.decode().split() == [f"hi-{i}", sid, "/app"], "the caller's env, its id, the WORKDIR"
            await mgr.remove_sandbox(sid, force=True)
            await full(mgr, "webpool", 1, 60)  # refilled
        print(f"template pool hand-out: p50 {statistics.median(handout) * 1000:.1f} ms, "
              f"max {max(handout) * 1000:.1f} ms; to the app answering: p50 {statistics.median(answer):.2f} s")
        assert mgr.template_pool("webpool").handed_out == 5
        assert mgr.list_sandboxes() == []
    finally:
        await mgr.close()
    assert sorted(p.name for p in (cfg.data_dir / "sandboxes").iterdir()) == []
    assert len(list((cfg.data_dir / "checkpoints").iterdir())) == 1, "the template (and its checkpoint) outlive the manager"
