"""Run inside the guest (``python3 -c``) by bench/run.py: the in-guest limits the agent is
compared with, measured by the guest's own Python with nothing of the agent in the way.

Prints one JSON object:
- ``spawn_true``: seconds per spawn+wait of ``true`` (posix_spawnp, PATH as the agent sets it);
- ``fork_exec_true``: the same with fork + execve from Python (what a Python agent does);
- ``pipe_read``: MiB/s a Python reader gets from ``head -c N /dev/zero`` through a 1 MiB pipe.
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


def main() -> None:
    n, mib = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps({"spawn_true": spawn_times(n), "fork_exec_true": fork_exec_times(n),
                      "pipe_read": pipe_read(mib << 20)}))


if __name__ == "__main__":
    main()
