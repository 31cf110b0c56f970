"""Templates without a VM: the Dockerfile parser, .dockerignore, packing and hostile
context tars, COPY archives and digests, cache keys, names, the state tables."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from arcbox_vm.manager.templates.layers import step_key
from arcbox_vm.models import SandboxSpec
from arcbox_vm.storage.state import StateStore
from arcbox_vm.templates import buildctx
from arcbox_vm.templates.buildctx import ContextError, copy_archive, is_ignored, pack_context, parse_dockerignore, \
    unpack_context
from arcbox_vm.templates.dockerfile import DockerfileError, logical_lines, parse, substitute
from arcbox_vm.templates.models import TemplateBuildSpec, check_template_name

# -- the Dockerfile --------------------------------------------------------------------------


def test_line_continuations_and_comments():
    text = "FROM arcbox:base\n# a comment\nRUN echo a \\\n  # inside\n  && echo b \\\n\n  && echo c\nENV X=1\n"
    assert logical_lines(text) == [(1, "FROM arcbox:base"), (3, "RUN echo a && echo b && echo c"), (8, "ENV X=1")]
    df = parse(text)
    assert df.steps[0].argv == ("/bin/sh", "-c", "echo a && echo b && echo c")


def test_exec_form_and_shell_form():
    df = parse('FROM arcbox:base\nRUN ["python3", "-c", "print(1)"]\nRUN [ -f /x ] || true\n'
               'START ["python3", "app.py"]\nREADY curl -f localhost\n')
    assert df.steps[0].argv == ("python3", "-c", "print(1)")
    assert df.steps[1].argv == ("/bin/sh", "-c", "[ -f /x ] || true")  # not JSON: the shell form
    assert df.start.argv == ("python3", "app.py") and df.ready.argv[:2] == ("/bin/sh", "-c")
    assert df.steps[0].text != df.steps[1].text


def test_arg_substitution_build_args_and_env():
    text = ("ARG BASE=arcbox:base\nFROM $BASE\nARG VER=1.0\nARG EMPTY\nENV V=${VER} W=\"a b\" D=${NOPE:-dflt}\n"
            "ENV P=${V:+set}\nWORKDIR /opt/$VER\nWORKDIR sub\nCOPY --chown=app:app x ${VER}.txt\nRUN echo \\$HOME\n")
    df = parse(text, {"VER": "2.5"})
    assert df.base == "arcbox:base"
    env = {k: v for s in df.steps if s.kind == "ENV" for k, v in s.env.items()}
    assert env == {"V": "2.5", "W": "a b", "D": "dflt", "P": "set"}
    workdirs = [s.value for s in df.steps if s.kind == "WORKDIR"]
    assert workdirs == ["/opt/2.5", "/opt/2.5/sub"]
    copy = next(s for s in df.steps if s.kind == "COPY")
    assert copy.sources == ("x",) and copy.dest == "2.5.txt" and copy.chown == "app:app"
    run = next(s for s in df.steps if s.kind == "RUN")
    assert run.args == {"BASE": "arcbox:base", "VER": "2.5", "EMPTY": ""}
    assert run.argv[-1] == "echo \\$HOME"  # RUN's text is the shell's, unsubstituted
    assert substitute("\\$X $X", {"X": "1"}) == "$X 1"


@pytest.mark.parametrize("text, match", [
    ("RUN true\n", "before FROM"),
    ("FROM arcbox:base\nCMD x\n", "line 2: CMD is not supported.*START"),
    ("FROM arcbox:base\nFROM arcbox:base\n", "second FROM"),
    ("FROM arcbox:base AS b\n", "one image"),
    ("FROM /etc/shadow\n", "FROM"),
    ("FROM arcbox:base\nCOPY --from=x a b\n", "multi-stage"),
    ("FROM arcbox:base\nADD https://x/y /\n", "URLs"),
    ("FROM arcbox:base\nCOPY onlyone\n", "a destination"),
    ("FROM arcbox:base\nSTART a\nRUN b\n", "after START"),
    ("FROM arcbox:base\nSTART a\nSTART b\n", "second START"),
    ("FROM arcbox:base\nENV 1X=2\n", "not a variable"),
    ("", "no FROM"),
])
def test_refused_dockerfiles_name_the_problem(text, match):
    with pytest.raises(DockerfileError, match=match):
        parse(text)


def test_an_undeclared_build_arg_is_an_error():
    with pytest.raises(DockerfileError, match="TYPO"):
        parse("FROM arcbox:base\nARG A\n", {"TYPO": "1"})


def test_oci_archive_and_template_bases_parse():
    assert parse("FROM oci-archive:img.tar\n").base == "oci-archive:img.tar"
    assert parse("FROM my-base.v2\n").base == "my-base.v2"


# -- names and specs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "web-app", "v1.2_x", "0" * 63])
def test_valid_names(name):
    assert check_template_name(name) == name


@pytest.mark.parametrize("name", ["", "A", ".hidden", "-x", "a/b", "..", "a b", "0" * 64, "é"])
def test_invalid_names(name):
    with pytest.raises(ValueError):
        check_template_name(name)
    with pytest.raises(ValueError):
        TemplateBuildSpec(name, "FROM arcbox:base\n")


def test_sandbox_spec_takes_a_template_name():
    assert SandboxSpec(template="web").template == "web"
    with pytest.raises(ValueError):
        SandboxSpec(template="../x")


# -- cache keys ------------------------------------------------------------------------------


def test_cache_keys_chain_and_cover_their_inputs():
    a = step_key("p", "RUN x", {"A": "1"})
    assert a == step_key("p", "RUN x", {"A": "1"}) and len(a) == 64
    assert len({a, step_key("q", "RUN x", {"A": "1"}), step_key("p", "RUN y", {"A": "1"}),
                step_key("p", "RUN x", {"A": "2"}), step_key("p", "RUN x", {"A": "1"}, "c")}) == 5
    assert step_key("p", "RUN x", {"A": "1", "B": "2"}) == step_key("p", "RUN x", {"B": "2", "A": "1"})


def test_copy_digest_follows_content_not_times(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "f.txt"
    f.write_text("one")
    _, d1, tops = copy_archive(tmp_path, ("d",), "/app")
    os.utime(f, (1, 1))
    assert copy_archive(tmp_path, ("d",), "/app")[1] == d1  # touched, same content: same key
    f.write_text("two")
    assert copy_archive(tmp_path, ("d",), "/app")[1] != d1
    f.chmod(0o755)
    assert tops == ["/app"]


def test_copy_destinations_follow_docker(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "c").write_text("c")

    def names(sources: tuple[str, ...], dest: str) -> list[str]:
        data, _, _ = copy_archive(tmp_path, sources, dest)
        return sorted(tarfile.open(fileobj=io.BytesIO(data)).getnames())

    assert names(("a.txt",), "/x/y.txt") == ["x/y.txt"]  # a file to a file name
    assert names(("a.txt",), "/x/") == ["x/a.txt"]  # into a directory
    assert names(("a.txt", "b.txt"), "/x") == ["x/a.txt", "x/b.txt"]  # several: a directory
    assert names(("*.txt",), "/x/") == ["x/a.txt", "x/b.txt"]  # globs
    assert names(("dir",), "/app") == ["app/sub", "app/sub/c"]  # a directory's contents
    with pytest.raises(ContextError, match="outside"):
        copy_archive(tmp_path, ("../etc/passwd",), "/x")
    with pytest.raises(ContextError, match="no such file"):
        copy_archive(tmp_path, ("missing",), "/x")


# -- .dockerignore and packing ---------------------------------------------------------------


def test_dockerignore_rules():
    rules = parse_dockerignore("# c\n*.log\n!keep.log\nbuild/\n**/*.tmp\n/secret\nsub/*/x\n")
    assert is_ignored("a.log", rules) and not is_ignored("keep.log", rules)
    assert is_ignored("build/out/f", rules) and is_ignored("deep/er/f.tmp", rules) and is_ignored("f.tmp", rules)
    assert is_ignored("secret", rules) and not is_ignored("dir/secret", rules)
    assert is_ignored("sub/a/x", rules) and not is_ignored("sub/a/b/x", rules)
    assert not is_ignored("src/a.py", rules)


def test_pack_honours_dockerignore_and_keeps_links_as_links(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("a")
    (tmp_path / "node_modules" / "x").mkdir(parents=True)
    (tmp_path / "node_modules" / "x" / "big").write_text("b")
    (tmp_path / "app.log").write_text("l")
    (tmp_path / "keep.log").write_text("k")
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / ".dockerignore").write_text("node_modules\n*.log\n!keep.log\n")
    data = pack_context(tmp_path)
    tf = tarfile.open(fileobj=io.BytesIO(data))
    assert sorted(tf.getnames()) == [".dockerignore", "keep.log", "link", "src", "src/a.py"]
    assert tf.getmember("link").issym() and all(m.uid == 0 and not m.uname for m in tf.getmembers())
    with pytest.raises(ContextError, match="larger"):
        pack_context(tmp_path, limit=1)


# -- hostile context tars (the daemon's side) --------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, body in members:
            info.size = len(body) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


@pytest.mark.parametrize("members, match", [
    ([(_member("../escape"), b"x")], "inside"),
    ([(_member("/etc/cron.d/x"), b"x")], "relative"),
    ([(_member("a/../../x"), b"x")], "inside"),
    ([(_member("dev", tarfile.CHRTYPE), b"")], "not a file"),
    ([(_member("fifo", tarfile.FIFOTYPE), b"")], "not a file"),
    ([(_member("up", tarfile.SYMTYPE, "../../etc"), b""), (_member("up/passwd"), b"x")], "refused"),
    ([(_member("abs", tarfile.SYMTYPE, "/etc/passwd"), b"")], "refused"),
    ([(_member("hard", tarfile.LNKTYPE, "../outside"), b"")], "refused|inside"),
])
def test_hostile_tars_are_refused_and_write_nothing_outside(tmp_path, members, match):
    dest = tmp_path / "ctx"
    dest.mkdir()
    with pytest.raises(ContextError, match=match):
        unpack_context(_tar(*members), dest)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()


def test_size_member_count_and_garbage_limits(tmp_path, monkeypatch):
    with pytest.raises(ContextError, match="larger"):
        unpack_context(_tar((_member("big"), b"x" * 2048)), tmp_path, limit=1024)
    monkeypatch.setattr(buildctx, "MAX_MEMBERS", 2)
    with pytest.raises(ContextError, match="entries"):
        unpack_context(_tar(*((_member(f"f{i}"), b"") for i in range(3))), tmp_path)
    with pytest.raises(ContextError, match="not a valid tar"):
        unpack_context(b"\x00garbage" * 200, tmp_path)


def test_setuid_bits_are_dropped(tmp_path):
    unpack_context(_tar((_member("tool", mode=0o4755), b"#!/bin/sh\n")), tmp_path)
    assert not (tmp_path / "tool").stat().st_mode & 0o4000


def test_a_packed_context_round_trips(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("content")
    (src / "rel").symlink_to("d/f")
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack_context(pack_context(src), dest)
    assert (dest / "d" / "f").read_text() == "content" and os.readlink(dest / "rel") == "d/f"


# -- the state tables ------------------------------------------------------------------------


def test_template_and_layer_rows(tmp_path: Path):
    st = StateStore(tmp_path)
    st.open()
    st.put_template({"name": "t", "key": "k", "checkpoint_id": "c", "created_at": 1.0, "meta": "{}"})
    st.put_template({"name": "t", "key": "k2", "checkpoint_id": "c2", "created_at": 2.0, "meta": "{}"})
    assert [(r["name"], r["key"]) for r in st.templates()] == [("t", "k2")]
    st.put_layer({"key": "l", "parent": "p", "step": "RUN x", "path": "/x", "size_bytes": 1, "created_at": 1.0,
                  "used_at": 1.0})
    st.touch_layer("l")
    assert st.layers()[0]["used_at"] > 1.0
    st.delete_layer("l")
    st.delete_template("t")
    assert st.layers() == [] and st.templates() == []
    st.close()


# -- the E2B API's templateID ------------------------------------------------------------------


def test_e2b_template_id_names_our_template_when_one_exists():
    from arcbox_vm.config.e2b import E2bConfig
    from arcbox_vm.e2b.context import E2bContext
    from arcbox_vm.e2b.control import ApiError, ControlPlane
    from arcbox_vm.e2b.keys import AccessTokens, ApiKeys
    from arcbox_vm.errors import InvalidArgument, TemplateNotFound
    from arcbox_vm.templates.models import TemplateInfo

    class Mgr:
        def inspect_template(self, name: str) -> TemplateInfo:
            if name != "webapp":
                raise TemplateNotFound(name)
            return TemplateInfo("webapp", "k", 0.0, "arcbox:base", 0, 256, 1, {}, "/app", "app", "", "")

        def resolve_image_names(self, spec):  # noqa: ANN001, ANN201
            raise InvalidArgument("no such image")

    cfg = E2bConfig()
    plane = ControlPlane(E2bContext(manager=Mgr(), config=cfg, api_keys=ApiKeys([]), tokens=AccessTokens(b"s" * 32)))
    spec = plane._spec({"templateID": "webapp", "metadata": {"m": "1"}})
    assert spec.template == "webapp" and spec.user == "app" and spec.labels["m"] == "1"
    assert plane._spec({}).template == ""  # base: the built image
    with pytest.raises(ApiError) as err:
        plane._spec({"templateID": "other"})
    assert err.value.status == 404


# -- COPY without tar: the Python unpacker (manager/templates/unpack.py) ------------------------


def test_python_unpacker_keeps_modes_owners_links_and_existing_dirs(tmp_path):
    import subprocess
    import sys

    from arcbox_vm.manager.templates.unpack import SCRIPT

    ctx = tmp_path / "ctx"
    (ctx / "d" / "sub").mkdir(parents=True)
    (ctx / "d" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "d" / "run.sh").chmod(0o775)
    (ctx / "d" / "sub" / "f").write_text("x")
    os.symlink("run.sh", ctx / "d" / "link")
    archive, _, tops = copy_archive(ctx, ("d",), "/app/")
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (root / "app").chmod(0o711)  # an existing directory keeps its mode
    tar = tmp_path / "copy.tar"
    tar.write_bytes(archive)
    res = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(root), str(tar), "1234:2345", *tops], check=False,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not tar.exists(), "the tar is removed"
    assert (root / "app" / "sub" / "f").read_text() == "x"
    assert (root / "app" / "run.sh").stat().st_mode & 0o7777 == 0o775
    assert os.readlink(root / "app" / "link") == "run.sh"
    assert (root / "app").stat().st_mode & 0o7777 == 0o711
    st = (root / "app" / "sub" / "f").stat()
    assert (st.st_uid, st.st_gid) == (1234, 2345), "--chown reaches every copied path"


def test_python_unpacker_refuses_names_out_of_the_root(tmp_path):
    import subprocess
    import sys

    from arcbox_vm.manager.templates.unpack import SCRIPT

    tar = tmp_path / "bad.tar"
    tar.write_bytes(_tar((_member("../escape"), b"x")))
    res = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(tmp_path / "root"), str(tar), ""], check=False,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "refused" in res.stderr
    assert not (tmp_path / "escape").exists()


def test_the_unpacker_knows_the_runtime_where_the_image_builder_puts_it():
    from arcbox_vm.images import runtime
    from arcbox_vm.manager.templates import unpack

    assert (unpack.PYTHON, unpack.LIB_DIR, unpack.LOADER) == (runtime.PYTHON, runtime.LIB_DIR, runtime.LOADER)
