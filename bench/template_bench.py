"""Template figures, measured in one run: a cold build and a cache-hit rebuild of a small
web-app template, and create→ready / create→app answering from the template vs a cold
create (+ starting the app and polling it, what a template saves), and the hand-out from
the template's warm pool (`[pool.templates]`) vs create→ready from the template."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, TemplateBuildSpec

from bench.snapshot_bench import config

NONE = SandboxNetworkSpec(mode="none")
APP = ("import http.server\nhttp.server.ThreadingHTTPServer(('127.0.0.1', 8080), "
       "http.server.SimpleHTTPRequestHandler).serve_forever()\n")
PROBE = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/', timeout=2)"
DOCKERFILE = f'''FROM arcbox:base
WORKDIR /srv
COPY app.py index.html ./
RUN python3 -m py_compile app.py
START ["python3", "app.py"]
READY ["python3", "-c", "{PROBE}"]
'''


async def _probe(mgr: SandboxManager, sid: str) -> None:
    while True:
        out = await (await mgr.run_in_sandbox(sid, ["python3", "-c", PROBE], timeout_seconds=10)).collect()
        if out[2] == 0:
            return
        await asyncio.sleep(0.1)


async def _from_template(mgr: SandboxManager) -> tuple[float, float]:
    t0 = time.perf_counter()
    sid, _ = await mgr.create_sandbox(SandboxSpec(template="bench-web"))
    await mgr.wait_ready(sid, 300)
    ready = time.perf_counter() - t0
    await _probe(mgr, sid)
    answering = time.perf_counter() - t0
    await mgr.remove_sandbox(sid, force=True)
    return ready, answering


async def _cold(mgr: SandboxManager, ctx: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    sid, _ = await mgr.create_sandbox(SandboxSpec(network=NONE))
    await mgr.wait_ready(sid, 300)
    ready = time.perf_counter() - t0

    async def data():  # noqa: ANN202
        yield (ctx / "app.py").read_bytes()

    await mgr.write_file(sid, "/srv/app.py", data(), make_parents=True)
    await mgr.start_exec(sid, ["python3", "app.py"], working_dir="/srv")
    await _probe(mgr, sid)
    answering = time.perf_counter() - t0
    await mgr.remove_sandbox(sid, force=True)
    return ready, answering


async def run(image, backend: str, rounds: int = 3) -> list[tuple[str, str, str, float | None]]:
    s = lambda v: f"{v:8.2f} s"  # noqa: E731
    rows: list[tuple[str, str, str, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="arcbox-tpl-bench-", dir="/var/tmp") as tmp:
        ctx = Path(tmp) / "ctx"
        ctx.mkdir()
        (ctx / "app.py").write_text(APP)
        (ctx / "index.html").write_text("hello")
        async with SandboxManager(config(image, Path(tmp) / "m", backend)) as mgr:
            spec = TemplateBuildSpec("bench-web", DOCKERFILE, ctx, network="none")
            t0 = time.perf_counter()
            await mgr.build_template(spec)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            await mgr.build_template(spec)
            hit = time.perf_counter() - t0
            rows.append(("template build: cold vs cache hit", s(build), s(hit), build / hit))
            tpl = [await _from_template(mgr) for _ in range(rounds)]
            cold = [await _cold(mgr, ctx) for _ in range(rounds)]
            for i, what in ((0, "ready"), (1, "app answers")):
                a, b = statistics.median(t[i] for t in tpl), statistics.median(c[i] for c in cold)
                rows.append((f"create→{what}: template vs cold", s(a), s(b), a / b))
        # the same data dir again, with a warm pool of one for the template ([pool.templates])
        cfg = config(image, Path(tmp) / "m", backend)
        cfg.pool.templates = {"bench-web": 1}
        async with SandboxManager(cfg) as mgr:
            pooled = []
            for _ in range(max(rounds, 10)):
                await _pool_full(mgr)
                pooled.append(await _from_template(mgr))
            hand = sorted(p[0] for p in pooled)
            p50, p99 = statistics.median(hand), hand[min(len(hand) - 1, int(len(hand) * 0.99))]
            plain = statistics.median(t[0] for t in tpl)
            rows.append(("create→ready: pool p50/p99 vs template", f"{p50 * 1000:.1f}/{p99 * 1000:.1f} ms",
                         s(plain), p50 / plain))
            rows.append(("create→app answers: pool vs template", s(statistics.median(p[1] for p in pooled)),
                          s(statistics.median(t[1] for t in tpl)),
                          statistics.median(p[1] for p in pooled) / statistics.median(t[1] for t in tpl)))
    return rows


async def _pool_full(mgr: SandboxManager, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (p := mgr.template_pool("bench-web")) is None or p.ready() < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the template pool did not fill")
        await asyncio.sleep(0.05)
