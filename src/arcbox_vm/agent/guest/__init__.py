"""The guest agent: the PID-1 program inside every VM (stdlib only, Python 3.8+).

Copied into guest images by ``arcbox_vm.agent.bundle``; the launcher calls
``arcbox_vm.agent.guest.main.main``. Modules, one job each:

- ``main``      entry point: argument parsing, PID-1 guard, never-exit wrapper
- ``log``       one-line event log to /dev/console (PID 1) or stderr
- ``cmdline``   kernel command-line and channel-spec parsing
- ``libc``      mount(2)/reboot(2) through ctypes, with fallbacks when ctypes is missing
- ``sysinit``   PID-1 boot duties: mounts, hostname, DNS, Ctrl-Alt-Del
- ``netcfg``    ``ip=`` parsing and interface/route setup with ioctls (no ``ip`` binary)
- ``transport`` opening the channel to the host (virtio-serial, vsock, unix socket)
- ``agent``     the single-threaded event loop; ``Agent`` combines the parts below
- ``connection`` dialing the host with backoff, HELLO, reading and writing the channel, losing it
- ``frames``    decode errors, routing frames by channel, channel 0 (HELLO_ACK, ERROR, SHUTDOWN)
- ``execs``     EXEC, ATTACH and the frames on an exec channel (stdin, credit, resize, signal)
- ``sessiontable`` attached/detached/abandoned sessions, EXIT, reaping, the detached spool budget
- ``transfers`` file requests in the loop: FILE_* routing, pumping reads, aborting on loss
- ``ports``     PORT_CONNECT and the forwarded TCP connections of the current connection
- ``shutdown``  SHUTDOWN / SIGTERM: end sessions, then reboot/poweroff (PID 1) or leave the loop
- ``session``   one exec session: pipes/pty, credit-based output, stdin, exit tracking
- ``filewrite`` FILE_WRITE: atomic upload through a temporary file, credit per write
- ``fileread``  FILE_READ: streamed download, pumped by the loop within the host's credit
- ``filestat``  FILE_STAT and FILE_LIST answers, bounded to one frame
- ``portconn``  one forwarded connection: a socket to 127.0.0.1:PORT, credit both ways, EOF
- ``fileinfo``  stat bodies, non-UTF-8 names and errno -> error code, shared by file requests
- ``fscreds``   acting as a request's uid/gid around filesystem calls (setfsuid/setfsgid)
- ``spawn``     user/env/cwd resolution and fork+exec with error reporting
- ``procs``     wait-status decoding, reaping, killing a session's processes
- ``power``     the shutdown sequence (TERM, KILL, sync, reboot/poweroff)
- ``rawbench``  the bare-channel benchmark mode (``arcbox.rawbench=1``)

Importing this package must stay cheap: guests boot under software emulation where
every imported module costs real time before the agent can say HELLO.
"""

AGENT_VERSION = "0.1.0"
