"""arcbox-vm fleet benchmark: a command's round trip through the fleet vs. through the
node's daemon directly, measured in one run on one machine.

    .venv/bin/python bench/cluster_bench.py [--vmm local|qemu] [--execs 200] [--json]

Starts a Ray head and one Ray node on loopback addresses (nothing leaves the machine),
one `arcbox-vm serve` joined to it — over the local VMM test double (the real guest
agent as a host process: `--vmm local`, the default) or booting a real QEMU microVM
(`--vmm qemu`, the built guest image) — and one sandbox (network "none"). Then, in
alternation, `run(["true"])` through `Fleet` (driver → the node service actor → the
daemon's Unix socket) and through the client on the daemon's socket. The ratio column
is fleet / direct (>1 = slower); the goal is ≤ 1.3× at the median.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from arcbox_vm.client import Client  # noqa: E402
from tests.support.ray_cluster import ARCBOX_DEFAULT, Proc, RayCluster, process_env  # noqa: E402

HEAD, NODE = "127.0.0.40", "127.0.0.41"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def daemon_config(root: Path, vmm: str, ray_address: str) -> Path:
    d = root / "node"
    d.mkdir()
    cluster = f'[cluster]\nray_address = "{ray_address}"\nnode_ip = "{NODE}"\nnode_name = "bench"\n'
    if vmm == "local":
        (d / "vmlinuz").write_bytes(b"not a kernel")
        (d / "rootfs.img").write_bytes(b"not a filesystem")
        body = (f'data_dir = "{d / "data"}"\n[grpc]\nunix_socket = "{d / "d.sock"}"\n'
                f'[defaults]\nkernel = "{d / "vmlinuz"}"\nrootfs = "{d / "rootfs.img"}"\n'
                '[daemon]\ncgroup_parent = ""\non_shutdown = "remove"\n')
    else:
        from arcbox_vm.images import build_image
        from arcbox_vm.paths import data_dir

        image = build_image(data_dir())
        body = (f'backend = "qemu"\ndata_dir = "{d / "data"}"\n[grpc]\nunix_socket = "{d / "d.sock"}"\n'
                f'[network]\ncidr = "10.243.0.0/24"\ngateway = "10.243.0.1"\n'
                f'netns = "arcbox-b-{secrets.token_hex(3)}"\n'
                f'[defaults]\nmemory_mib = 256\nkernel = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
                f'rootfs = "{image.rootfs}"\n[daemon]\non_shutdown = "remove"\n')
    path = d / "config.toml"
    path.write_text(body + cluster)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", choices=("local", "qemu"), default="local")
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    import ray

    from arcbox_vm.cluster import Fleet

    root = Path(tempfile.mkdtemp(prefix="abxb"))
    (root / "run").mkdir()
    cluster = RayCluster(root, HEAD)
    daemon: Proc | None = None
    try:
        cluster.start_head()
        cluster.start_node("n1", NODE)
        config = daemon_config(root, args.vmm, cluster.address)
        argv = ([sys.executable, "-m", "tests.support.local_daemon", str(config)] if args.vmm == "local"
                else [ARCBOX_DEFAULT, "serve", "--config", str(config)])
        daemon = Proc(argv, root / "daemon.log", process_env(ARCBOX_VM_RUNTIME_DIR=str(root / "run"))).start()
        fleet = Fleet(cluster.address, node_ip=HEAD)
        deadline = time.monotonic() + 120
        while not any(n.alive for n in fleet.nodes()):
            if time.monotonic() > deadline or not daemon.running:
                raise SystemExit(f"the node did not join: {daemon.tail()}")
            time.sleep(0.5)
        sb = fleet.create(network="none", timeout=300)
        direct = Client(socket=root / "node" / "d.sock")
        fleet_ms: list[float] = []
        direct_ms: list[float] = []
        for i in range(args.warmup + args.execs):
            t0 = time.perf_counter()
            r1 = sb.run(["true"])
            t1 = time.perf_counter()
            r2 = direct.run(sb.id, ["true"])
            t2 = time.perf_counter()
            assert r1.ok and r2.ok
            if i >= args.warmup:
                fleet_ms.append((t1 - t0) * 1000)
                direct_ms.append((t2 - t1) * 1000)
        result = {
            "vmm": args.vmm, "execs": args.execs,
            "direct_ms": {"p50": pct(direct_ms, 50), "mean": statistics.mean(direct_ms), "p90": pct(direct_ms, 90)},
            "fleet_ms": {"p50": pct(fleet_ms, 50), "mean": statistics.mean(fleet_ms), "p90": pct(fleet_ms, 90)},
        }
        result["ratio_p50"] = result["fleet_ms"]["p50"] / result["direct_ms"]["p50"]
        result["ratio_mean"] = result["fleet_ms"]["mean"] / result["direct_ms"]["mean"]
        sb.remove()
        direct.close()
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"exec round trip of `true` ({args.vmm}, {args.execs} each, alternating)")
            print(f"{'':10}{'p50 ms':>10}{'mean ms':>10}{'p90 ms':>10}")
            for name in ("direct", "fleet"):
                m = result[f"{name}_ms"]
                print(f"{name:10}{m['p50']:10.2f}{m['mean']:10.2f}{m['p90']:10.2f}")
            print(f"{'ratio':10}{result['ratio_p50']:10.2f}{result['ratio_mean']:10.2f}")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        ray.shutdown()
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
