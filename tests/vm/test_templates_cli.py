"""Templates through the daemon and the CLI as a user runs them: `template build` sends
the Dockerfile and the context (a tar, .dockerignore honoured) to `arcbox-vm serve`,
`create --template` makes a sandbox whose service answers at once, a failing build
names its step and exit code, `template rm` / `prune` clean up.
"""

from __future__ import annotations

import json

import pytest

from .daemon_helpers import arcbox, module_daemon, ok

pytestmark = pytest.mark.vm

DOCKERFILE = '''\
FROM arcbox:base
ENV PORT=8081
WORKDIR /srv
COPY site/ ./
RUN echo built-by-run > stamp.txt
START python3 -m http.server $PORT --bind 127.0.0.1
READY python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/stamp.txt', timeout=2)"
'''
FETCH = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8081/index.html').read().decode())"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    with module_daemon(tmp_path_factory.mktemp("tpl-daemon"), guest_image, "10.243.0.0/24") as d:
        yield d



def test_build_create_fail_and_remove_through_the_cli(daemon, tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "site").mkdir(parents=True)
    (ctx / "site" / "index.html").write_text("hello from a template")
    (ctx / "site" / "big.bin").write_text("x")
    (ctx / ".dockerignore").write_text("**/*.bin\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    p = arcbox(daemon, "template", "build", "site", "-f", str(ctx / "Dockerfile"))
    out, err = ok(p), p.stderr.decode()
    assert out.splitlines()[-1] == "site"
    assert "Step 1/7 : FROM arcbox:base" in err and "Step 7/7 : READY" in err, err
    again = arcbox(daemon, "template", "build", "site", "-f", str(ctx / "Dockerfile"))
    assert ok(again).splitlines()[-1] == "site" and again.stderr.decode().count("CACHED") == 5

    assert ok(arcbox(daemon, "template", "ls", "-q")) == "site\n"
    info = json.loads(ok(arcbox(daemon, "template", "inspect", "site")))
    assert info["working_dir"] == "/srv" and info["env"] == {"PORT": "8081"}

    sid = ok(arcbox(daemon, "create", "--template", "site")).splitlines()[-1]
    try:
        assert ok(arcbox(daemon, "exec", sid, "--", "python3", "-c", FETCH)).strip() == "hello from a template"
        assert ok(arcbox(daemon, "exec", sid, "--", "ls")).split() == ["index.html", "stamp.txt"]
        bad = arcbox(daemon, "create", "--template", "site", "--memory", "512")
        assert bad.returncode == 1 and b"memory_mib" in bad.stderr
    finally:
        ok(arcbox(daemon, "rm", "-f", sid))

    (ctx / "Broken").write_text("FROM site\nRUN echo before-failing; ls /nope\n")
    p = arcbox(daemon, "template", "build", "broken", "-f", str(ctx / "Broken"))
    assert p.returncode == 1
    err = p.stderr.decode()
    assert "step 2" in err and "exit code 2" in err and "No such file or directory" in err, err
    assert p.stdout.decode().startswith("before-failing")
    assert ok(arcbox(daemon, "template", "ls", "-q")) == "site\n"
    assert ok(arcbox(daemon, "ls", "-q")) == ""  # no build sandbox left

    assert ok(arcbox(daemon, "template", "rm", "site")) == "site\n"
    assert ok(arcbox(daemon, "template", "ls", "-q")) == ""
    assert "removed" in ok(arcbox(daemon, "template", "prune"))
    missing = arcbox(daemon, "create", "--template", "site")
    assert missing.returncode == 1 and b"no template named 'site'" in missing.stderr
