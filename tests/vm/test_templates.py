"""Templates on real VMs: build from a Dockerfile, cache, sandboxes from a template, failure.

One manager and one template per module (a cold build boots two VMs): the tests run in
file order and share it. TAP networking lives in a network namespace the module creates;
builds have egress "none", so nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxSpec, TemplateBuildSpec
from arcbox_vm.errors import InvalidArgument, TemplateBuildFailed, TemplateNotFound
from arcbox_vm.templates.models import BuildProgress

from .manager_helpers import fresh_netns_name, make_config

pytestmark = pytest.mark.vm

APP = '''\
import http.server, os
DATA = open("data.txt").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ["GREETING"] + ":" + DATA).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), H).serve_forever()
'''

DOCKERFILE = '''\
# a small web app, its data and a "compiled" step
FROM arcbox:base
ARG PORT=8080
ENV GREETING=hello \\
    APP_PORT=$PORT
WORKDIR /app
COPY app.py ./
RUN python3 -m py_compile app.py && echo compiled > build-info.txt
COPY data.txt ./
RUN wc -c < data.txt > data.size
START ["python3", "app.py"]
READY python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ['APP_PORT'], timeout=2)"
'''
FETCH = "import os, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ['APP_PORT']).read().decode())"
COPY_DATA_STEP = 7  # FROM=1, ARG=2, ENV=3, WORKDIR=4, COPY app=5, RUN=6, COPY data=7, RUN=8, START=9, READY=10


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.fixture(scope="module")
def netns():
    ns = fresh_netns_name()
    assert sh("ip", "netns", "add", ns).returncode == 0
    yield ns
    sh("ip", "netns", "del", ns)


@pytest.fixture(scope="module")
async def mgr(backend, guest_image, tmp_path_factory, netns):
    cfg = make_config(backend, guest_image, tmp_path_factory.mktemp("tpl") / "data", cidr="10.234.0.0/24",
                      netns=netns)
    async with SandboxManager(cfg) as m:
        yield m


@pytest.fixture(scope="module")
def context_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ctx")
    (d / "app.py").write_text(APP)
    (d / "data.txt").write_text("data-v1")
    (d / "secret.txt").write_text("never sent")
    (d / ".dockerignore").write_text("secret.txt\n*.log\n")
    (d / "build.log").write_text("ignored too")
    return d


class Events:
    def __init__(self) -> None:
        self.items: list[BuildProgress] = []

    def __call__(self, ev: BuildProgress) -> None:
        self.items.append(ev)

    def steps(self, kind: str) -> list[int]:
        return [e.step for e in self.items if e.kind == kind]

    def output(self) -> str:
        return b"".join(e.data for e in self.items if e.kind == "output").decode(errors="replace")


async def build(mgr: SandboxManager, context_dir: Path, name: str = "webapp",
                dockerfile: str = DOCKERFILE) -> tuple[Events, float]:
    ev = Events()
    t0 = time.monotonic()
    await mgr.build_template(TemplateBuildSpec(name, dockerfile, context_dir), on_progress=ev)
    return ev, time.monotonic() - t0


@pytest.fixture(scope="module")
async def built(mgr, context_dir):
    ev, seconds = await build(mgr, context_dir)
    print(f"cold template build: {seconds:.1f} s")
    return ev, seconds


async def run(mgr: SandboxManager, sid: str, cmd: list[str]) -> str:
    out, err, code = await (await mgr.run_in_sandbox(sid, cmd, timeout_seconds=60)).collect()
    assert code == 0, (cmd, out, err)
    return out.decode().strip()


async def test_a_sandbox_from_the_template_serves_at_once(mgr, built):
    ev, _ = built
    assert ev.steps("cached") == []
    assert "compiled" not in ev.output()  # RUN's own output went to a file; nothing failed
    info = mgr.inspect_template("webapp")
    assert info.env["GREETING"] == "hello" and info.working_dir == "/app"
    t0 = time.monotonic()
    sid, _ = await mgr.create_sandbox(SandboxSpec(template="webapp", labels={"who": "test"}))
    await mgr.wait_ready(sid)
    ready_s = time.monotonic() - t0
    try:
        # immediately: the service was running when the checkpoint was taken
        assert await run(mgr, sid, ["python3", "-c", FETCH]) == "hello:data-v1"
        assert await run(mgr, sid, ["pwd"]) == "/app"  # WORKDIR is the default
        assert await run(mgr, sid, ["cat", "build-info.txt", "data.size"]) == "compiled\n7"
        assert await run(mgr, sid, ["sh", "-c", "ls __pycache__ | grep -c app"]) == "1"
        assert await run(mgr, sid, ["sh", "-c", "ls /app | sort | tr '\\n' ' '"]) == \
            "__pycache__ app.py build-info.txt data.size data.txt"  # .dockerignore honoured
        labels = mgr.inspect_sandbox(sid).labels
        assert labels["who"] == "test" and labels["arcbox.template"] == "webapp"
        assert mgr.list_checkpoints() == []  # the template's checkpoint is its own, not listed
    finally:
        await mgr.remove_sandbox(sid, force=True)
    print(f"create -> ready from the template: {ready_s:.2f} s")
    assert ready_s < 10


async def test_an_unchanged_rebuild_is_a_cache_hit(mgr, built, context_dir):
    before = mgr.inspect_template("webapp")
    ev, seconds = await build(mgr, context_dir)
    print(f"cache-hit rebuild: {seconds:.2f} s")
    assert ev.steps("step") == [] and len(ev.steps("cached")) == 8
    assert ev.items[-1].kind == "done" and ev.items[-1].cached
    assert mgr.inspect_template("webapp").key == before.key
    assert seconds < 5


async def test_a_changed_file_rebuilds_from_its_copy_step_only(mgr, built, context_dir):
    (context_dir / "data.txt").write_text("data-v2!")
    try:
        ev, seconds = await build(mgr, context_dir)
    finally:
        (context_dir / "data.txt").write_text("data-v1")
    print(f"rebuild from step {COPY_DATA_STEP}: {seconds:.1f} s")
    assert ev.steps("cached") == list(range(1, COPY_DATA_STEP))
    assert ev.steps("step") == list(range(COPY_DATA_STEP, 11))
    sid, _ = await mgr.create_sandbox(SandboxSpec(template="webapp"))
    try:
        await mgr.wait_ready(sid)
        assert await run(mgr, sid, ["python3", "-c", FETCH]) == "hello:data-v2!"
        assert await run(mgr, sid, ["cat", "data.size"]) == "8"
    finally:
        await mgr.remove_sandbox(sid, force=True)


async def test_a_failing_run_names_its_step_and_leaves_nothing(mgr, built, context_dir):
    data = mgr.data_dir
    templates_before = [t.name for t in mgr.list_templates()]
    checkpoints_before = sorted(p.name for p in (data / "checkpoints").iterdir())
    bad = "FROM arcbox:base\nRUN echo about to fail && echo oops >&2 && exit 3\nSTART sleep 1000\n"
    ev = Events()
    with pytest.raises(TemplateBuildFailed) as err:
        await mgr.build_template(TemplateBuildSpec("broken", bad, context_dir), on_progress=ev)
    assert err.value.step == 2 and err.value.exit_code == 3
    assert "oops" in err.value.output and "about to fail" in ev.output()
    assert "step 2" in str(err.value) and "exit code 3" in str(err.value)
    assert [t.name for t in mgr.list_templates()] == templates_before
    assert mgr.list_sandboxes() == []  # the build sandbox is gone
    assert sorted(p.name for p in (data / "checkpoints").iterdir()) == checkpoints_before
    assert list((data / "sandboxes").iterdir()) == []
    assert not list((data / "templates" / "layers").glob("*.part"))
    assert not (data / "templates" / "tmp").exists() or not list((data / "templates" / "tmp").iterdir())
    with pytest.raises(TemplateNotFound):
        mgr.inspect_template("broken")


async def test_bad_input_is_refused_before_any_vm(mgr, context_dir):
    with pytest.raises(InvalidArgument, match="line 2"):
        await mgr.build_template(TemplateBuildSpec("x", "FROM arcbox:base\nCMD [\"x\"]\n", context_dir))
    with pytest.raises(InvalidArgument, match="must be a file in the build context"):
        await mgr.build_template(TemplateBuildSpec("x", "FROM oci-archive:img.tar\n", context_dir))
    with pytest.raises(InvalidArgument, match="no such file"):
        await mgr.build_template(TemplateBuildSpec("x", "FROM arcbox:base\nCOPY secret.txt /\n", context_dir))
    assert mgr.list_sandboxes() == []


# no tar (nor python3): COPY unpacks with the agent's runtime (manager/templates/unpack.py)
OCI_APPLETS = ("sh", "cat", "echo", "mkdir", "rm", "sync", "chown", "ls", "sleep", "httpd", "wget")
OCI_DOCKERFILE = """\
FROM oci-archive:images/busybox.tar
COPY data.txt www/index.html
COPY --chown=1000:1000 app.py www/
RUN echo "made by RUN in $PWD" > www/run.txt
START ["httpd", "-f", "-p", "8088", "-h", "www"]
READY wget -q -O /dev/null http://127.0.0.1:8088/index.html
"""


async def test_a_template_from_an_oci_archive_in_the_context(mgr, context_dir, backend):
    if backend != "qemu":
        pytest.skip("an imported image boots with the built image's initramfs: QEMU here")
    from arcbox_vm.images import tools
    from tests.support.oci_archives import busybox_layer, oci_archive

    (context_dir / "images").mkdir(exist_ok=True)
    oci_archive(context_dir / "images" / "busybox.tar", [busybox_layer(tools.static_busybox(), OCI_APPLETS)],
                env=["PATH=/bin", "GREETING=from-oci"], workdir="/srv")
    try:
        ev, seconds = await build(mgr, context_dir, "busy", OCI_DOCKERFILE)
        print(f"template from an OCI archive: {seconds:.1f} s")
        info = mgr.inspect_template("busy")
        assert info.env == {"PATH": "/bin", "GREETING": "from-oci"} and info.working_dir == "/srv"
        sid, _ = await mgr.create_sandbox(SandboxSpec(template="busy"))
        try:
            await mgr.wait_ready(sid)
            assert await run(mgr, sid, ["wget", "-q", "-O", "-", "http://127.0.0.1:8088/index.html"]) == "data-v1"
            assert await run(mgr, sid, ["cat", "www/run.txt"]) == "made by RUN in /srv"
            assert (await run(mgr, sid, ["ls", "-ln", "www/app.py"])).split()[2:4] == ["1000", "1000"]
            assert await run(mgr, sid, ["sh", "-c", "ls /bin/tar /usr/bin/tar /bin/python3 2>/dev/null; echo none"]) == "none"
        finally:
            await mgr.remove_sandbox(sid, force=True)
        again, _ = await build(mgr, context_dir, "busy", OCI_DOCKERFILE)
        assert again.items[-1].cached  # the archive's import is cached by its sha256 too
    finally:
        (context_dir / "images" / "busybox.tar").unlink()
        mgr.remove_template("busy")


async def test_removing_a_template_in_use_keeps_its_sandboxes_running(mgr, built):
    sid, _ = await mgr.create_sandbox(SandboxSpec(template="webapp"))
    await mgr.wait_ready(sid)
    try:
        assert mgr.inspect_template("webapp").in_use == 1
        assert mgr.remove_template("webapp") == 1
        with pytest.raises(TemplateNotFound):
            await mgr.create_sandbox(SandboxSpec(template="webapp"))
        await asyncio.sleep(0.5)
        assert (await run(mgr, sid, ["python3", "-c", FETCH])).startswith("hello:")
    finally:
        await mgr.remove_sandbox(sid, force=True)
    removed, freed = mgr.prune_templates()
    assert removed >= 4 and freed > 0
    assert not list((mgr.data_dir / "templates" / "layers").iterdir())
