"""Entry point of the guest agent (``/sbin/vm-agent`` calls ``main()``).

The same program runs as PID 1 in a VM and as an ordinary process in tests; PID-1 duties
(mounts, network, reaping orphans, rebooting) happen only when ``os.getpid() == 1``.

Usage (outside a VM)::

    python -m arcbox_vm.agent.guest.main --connect unix:/tmp/agent.sock [--rawbench]

The channel comes from ``--connect``, else ``$ARCBOX_AGENT_CONNECT``, else the kernel's
``arcbox.channel=``, else autodetection. As PID 1, unknown arguments are ignored: the
kernel passes unrecognised command-line words to init as arguments.

Only what is needed to say HELLO is imported up front; exec support (spawn, session,
pwd, termios...) loads on the first EXEC, because imports are slow under emulation.
"""

from __future__ import annotations

import os
import sys
import time

from . import log as logmod
from .log import log, log_exc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import List, Optional

USAGE = "usage: python -m arcbox_vm.agent.guest.main [--connect serial:NAME|vsock:PORT|unix:PATH] [--rawbench]\n"
ENV_CONNECT = "ARCBOX_AGENT_CONNECT"


class Options:
    __slots__ = ("connect", "rawbench")

    def __init__(self) -> None:
        self.connect: Optional[str] = None
        self.rawbench = False


def parse_args(argv: List[str], strict: bool) -> Options:
    """Parse our two flags. ``strict`` (not PID 1) exits with usage on anything else."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--connect" and i + 1 < len(argv):
            opts.connect = argv[i + 1]
            i += 1
        elif arg.startswith("--connect="):
            opts.connect = arg[len("--connect=") :]
        elif arg == "--rawbench":
            opts.rawbench = True
        elif arg in ("-h", "--help") and strict:
            sys.stdout.write(USAGE)
            sys.exit(0)
        elif strict:
            sys.stderr.write("unknown argument %r\n%s" % (arg, USAGE))
            sys.exit(2)
        i += 1
    return opts


def main(argv: Optional[List[str]] = None) -> None:
    pid1 = os.getpid() == 1
    opts = parse_args(sys.argv[1:] if argv is None else argv, strict=not pid1)
    if not pid1:
        _run(opts, pid1)
        return
    while True:  # PID 1 must never exit: the kernel would panic
        try:
            _run(opts, pid1)
        except BaseException:
            log_exc("agent crashed; restarting in 1 s")
            time.sleep(1.0)


_booted = False


def _run(opts: Options, pid1: bool) -> None:
    global _booted
    from arcbox_vm.agent import protocol

    from . import cmdline, sysinit

    sysinit.ensure_std_fds()
    logmod.init(console=pid1)
    log("agent starting (pid %d, python %d.%d)" % (os.getpid(), sys.version_info[0], sys.version_info[1]))
    if pid1 and not _booted:
        _booted = True
        started = time.monotonic()
        sysinit.setup()  # mounts /proc before anything reads the command line
        log("PID-1 setup done in %.3f s" % (time.monotonic() - started))
    args = cmdline.parse_cmdline(cmdline.read_cmdline())

    from .transport import make_transport

    spec = opts.connect or os.environ.get(ENV_CONNECT) or args.get(protocol.CHANNEL_CMDLINE_KEY, "") or "auto"
    try:
        transport = make_transport(spec)
    except ValueError as exc:
        log("%s; falling back to autodetection" % exc)
        transport = make_transport("auto")

    if opts.rawbench or args.get("arcbox.rawbench") == "1":
        from . import rawbench

        rawbench.run(transport, pid1)
        return

    from .agent import Agent, Shutdown

    if pid1:
        from . import spawn

        spawn.batch_scheduling()
    agent = Agent(transport, pid1)
    try:
        agent.run()
    except Shutdown:
        log("agent stopped")


if __name__ == "__main__":
    main()
