"""A process that takes file locks as a test tells it: run by tests/e2e/test_mount_locks.py.

    python _locker.py

Reads one command a line on stdin and answers each with one line on stdout, `ok [VALUES]`
or `err ERRNO`, once the call returned (so a blocked lock call answers only when granted):

    open PATH                 -> ok N     (N: the descriptor's number, 0, 1, ... in order)
    close N
    flock N OP                OP: sh, ex or un, `,nb` added for LOCK_NB (e.g. ex,nb)
    setlk N TYPE START LEN    fcntl F_SETLK; TYPE: rd, wr or un; LEN 0: up to the end
    setlkw N TYPE START LEN   fcntl F_SETLKW
    getlk N TYPE START LEN    fcntl F_GETLK -> ok TYPE START LEN PID (TYPE un: no conflict)
    alarm SECONDS             a SIGALRM after SECONDS, whose handler does nothing

The locks are taken through libc (ctypes), not Python's fcntl module: a call that a signal
interrupts answers `err 4` (EINTR) instead of being retried.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
TYPES = {"rd": fcntl.F_RDLCK, "wr": fcntl.F_WRLCK, "un": fcntl.F_UNLCK}
NAMES = {v: k for k, v in TYPES.items()}
OPS = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN, "nb": fcntl.LOCK_NB}


class Flock(ctypes.Structure):  # struct flock (64-bit off_t)
    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int32),
    ]


def check(result: int) -> None:
    if result == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def record_lock(fd: int, cmd: int, kind: str, start: str, length: str) -> Flock:
    lock = Flock(TYPES[kind], os.SEEK_SET, int(start), int(length), 0)
    check(libc.fcntl(fd, cmd, ctypes.byref(lock)))
    return lock


def run(fds: list[int | None], words: list[str]) -> str:
    cmd, args = words[0], words[1:]
    if cmd == "open":
        fds.append(os.open(args[0], os.O_RDWR))
        return f"ok {len(fds) - 1}"
    if cmd == "alarm":
        signal.signal(signal.SIGALRM, lambda signum, frame: None)
        signal.setitimer(signal.ITIMER_REAL, float(args[0]))
        return "ok"
    fd = fds[int(args[0])]
    assert fd is not None, "closed"
    if cmd == "close":
        fds[int(args[0])] = None
        os.close(fd)
    elif cmd == "flock":
        op = 0
        for word in args[1].split(","):
            op |= OPS[word]
        check(libc.flock(fd, op))
    elif cmd == "setlk":
        record_lock(fd, fcntl.F_SETLK, *args[1:])
    elif cmd == "setlkw":
        record_lock(fd, fcntl.F_SETLKW, *args[1:])
    elif cmd == "getlk":
        lock = record_lock(fd, fcntl.F_GETLK, *args[1:])
        return f"ok {NAMES[lock.l_type]} {lock.l_start} {lock.l_len} {lock.l_pid}"
    else:
        raise ValueError(f"unknown command {cmd!r}")
    return "ok"


def main() -> None:
    fds: list[int | None] = []
    for line in sys.stdin:
        try:
            answer = run(fds, line.split())
        except OSError as error:
            answer = f"err {error.errno}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
