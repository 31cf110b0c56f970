"""Run inside the guest (``python3 -c``) by bench/run.py: the in-guest limits the agent is
compared with, measured by the guest's own Python with nothing of the agent in the way.

``python3 -c <this> spawn N`` prints the seconds per spawn+wait of ``true`` (posix_spawnp,
PATH as the agent sets it) of N spawns, a JSON list: the benchmark alternates those with N
execs through the agent, round by round.

``python3 -c <this> N MIB`` prints one JSON object:
- ``fork_exec_true``: spawn+wait of ``true`` with fork + execve from Python (what a Python
  agent does);
- ``pipe_read``: MiB/s a Python reader gets from ``head -c N /dev/zero`` through a 1 MiB pipe;
- ``file_write``: MiB/s Python writes a file in 256 KiB writes, fsync included (what an upload
  must do besides receiving);
- ``file_read``: MiB/s Python reads that file back in 256 KiB reads, page cache warm (what a
  download must do besides sending).
Stdlib only, no imports of arcbox_vm (the guest has just the agent's files).
"""

import json
import os
import sys
import time

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": PATH, "HOME": "/root"}


def spawn_times(n: int) -> list:
    out = []
    for _ in range(n + 5):
        t = time.perf_counter()
        pid = os.posix_spawnp("true", ["true"], ENV)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - t)
    return out[5:]


def fork_exec_times(n: int) -> list:
    out = []
    for _ in range(n + 5):
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.execve("/usr/bin/true", ["true"], ENV)
            finally:
                os._exit(127)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - t)
    return out[5:]


def pipe_read(nbytes: int) -> float:
    import fcntl

    r, w = os.pipe()
    try:
        fcntl.fcntl(r, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    pid = os.posix_spawnp("head", ["head", "-c", str(nbytes), "/dev/zero"], ENV,
                          file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
    os.close(w)
    got = 0
    while True:
        n = os.readv(r, [buf])
        if not n:
            break
        got += n
    os.waitpid(pid, 0)
    took = time.perf_counter() - t
    assert got == nbytes, got
    return nbytes / took / (1 << 20)


def file_rates(nbytes: int, path: str = "/root/ceiling.bin") -> tuple:
    block = memoryview(os.urandom(256 * 1024))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    for _ in range(nbytes // len(block)):
        os.write(fd, block)
    os.fsync(fd)
    write = nbytes / (time.perf_counter() - t) / (1 << 20)
    os.close(fd)
    buf = bytearray(len(block))
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    while os.readv(fd, [buf]):
        pass
    read = nbytes / (time.perf_counter() - t) / (1 << 20)
    os.close(fd)
    os.unlink(path)
    return write, read


def main() -> None:
    if sys.argv[1] == "spawn":  # one round of the interleaved exec comparison (bench/run.py)
        print(json.dumps(spawn_times(int(sys.argv[2]))))
        return
    n, mib = int(sys.argv[1]), int(sys.argv[2])
    write, read = file_rates(mib << 20)
    print(json.dumps({"fork_exec_true": fork_exec_times(n),
                      "pipe_read": pipe_read(mib << 20), "file_write": write, "file_read": read}))


if __name__ == "__main__":
    main()
