"""File locks across two mounts of one volume (two processes, as on two nodes): flock(2) and
POSIX record locks (fcntl F_SETLK/F_SETLKW/F_GETLK) exclude the processes of both, are
dropped when their holder closes or dies, and a waiter blocked on the other mount's lock can
be interrupted by a signal or killed.

The lock calls run in _locker.py processes, one per simulated client, each started and
killed by PID here."""

from __future__ import annotations

import errno
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _mount_helpers import wait_for

LOCKER = str(Path(__file__).with_name("_locker.py"))
BLOCKED = 0.5  # how long a waiter must stay blocked to count as blocked
CONFLICT = (f"err {errno.EAGAIN}", f"err {errno.EACCES}")  # F_SETLK's conflict answers


class Locker:
    """One _locker.py process: locker("command") sends a line and returns the answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, LOCKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
        self.pid = self.proc.pid
        self._answers: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._answers.put(line.strip())

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 10) -> str:
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"locker {self.pid}: no answer within {timeout}s") from None

    def blocked(self, wait: float = BLOCKED) -> bool:
        """True if the last command has not answered within `wait` seconds."""
        try:
            answer = self._answers.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"locker {self.pid} answered {answer!r} instead of blocking")

    def __call__(self, command: str, timeout: float = 10) -> str:
        self.send(command)
        return self.answer(timeout)

    def open(self, path: Path) -> None:
        assert self(f"open {path}").startswith("ok"), path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def lockers():
    """lockers() -> a new Locker; every one is killed (by its PID) at teardown."""
    made: list[Locker] = []

    def make() -> Locker:
        made.append(Locker())
        return made[-1]

    try:
        yield make
    finally:
        for locker in made:  # all at once: a waiter may wait for another's lock
            if locker.proc.poll() is None:
                locker.proc.kill()
        stuck = []
        for locker in made:
            try:
                locker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stuck.append(locker.pid)  # in the kernel, waiting for an answer
                continue
            locker.reader.join(timeout=10)  # it reads to the end of the dead process's output
            for pipe in (locker.proc.stdin, locker.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        assert not stuck, f"lockers {stuck} did not exit after SIGKILL"


@pytest.fixture
def two(volume, mounts) -> tuple[Path, Path]:
    """(a, b): the same file `lockfile`, seen through two mounts of one volume."""
    a = mounts(volume, name="a").path
    b = mounts(volume, name="b").path
    (a / "lockfile").write_bytes(b"x" * 4096)
    wait_for(lambda: (b / "lockfile").exists(), 5, "the lock file in the second mount")
    return a / "lockfile", b / "lockfile"


def opened(lockers, path: Path, count: int = 1) -> Locker:
    locker = lockers()
    for _ in range(count):
        locker.open(path)
    return locker


def eventually(locker: Locker, command: str, timeout: float = 5) -> None:
    """command answers ok within timeout (for what the kernel finishes after a close or an
    exit returned: the release of an open file comes in the background)."""
    wait_for(lambda: locker(command) == "ok", timeout, f"{command!r} granted")


# -- flock --------------------------------------------------------------------------------------


def test_flock_exclusive_waits_for_the_other_mount(two, lockers):
    a, b = two
    holder, waiter = opened(lockers, a), opened(lockers, b)
    assert holder("flock 0 ex") == "ok"
    assert waiter("flock 0 ex,nb") == f"err {errno.EWOULDBLOCK}"
    assert waiter("flock 0 sh,nb") == f"err {errno.EWOULDBLOCK}"

    waiter.send("flock 0 ex")
    assert waiter.blocked()
    assert holder("flock 0 un") == "ok"
    assert waiter.answer(timeout=5) == "ok"
    assert holder("flock 0 sh,nb") == f"err {errno.EWOULDBLOCK}"  # and now the other way


def test_flock_shared_locks_coexist_across_mounts(two, lockers):
    a, b = two
    reader_a, reader_b, writer = opened(lockers, a), opened(lockers, b), opened(lockers, b)
    assert reader_a("flock 0 sh") == "ok"
    assert reader_b("flock 0 sh,nb") == "ok"
    assert writer("flock 0 ex,nb") == f"err {errno.EWOULDBLOCK}"
    assert reader_a("flock 0 un") == "ok"
    assert writer("flock 0 ex,nb") == f"err {errno.EWOULDBLOCK}"  # reader_b still reads
    # A shared lock converts to an exclusive one once it is the only one left.
    assert reader_b("flock 0 ex,nb") == "ok"
    assert reader_a("flock 0 sh,nb") == f"err {errno.EWOULDBLOCK}"


def test_flock_is_released_by_close_and_by_exit(two, lockers):
    a, b = two
    other = opened(lockers, b)
    holder = opened(lockers, a)
    assert holder("flock 0 ex") == "ok"
    assert holder("close 0") == "ok"
    eventually(other, "flock 0 ex,nb")
    assert other("flock 0 un") == "ok"

    holder = opened(lockers, a)
    assert holder("flock 0 ex") == "ok"
    assert other("flock 0 ex,nb") == f"err {errno.EWOULDBLOCK}"
    holder.kill()  # SIGKILL: the kernel closes its files
    eventually(other, "flock 0 ex,nb")


# -- POSIX record locks ---------------------------------------------------------------------------


def test_record_locks_conflict_by_range_across_mounts(two, lockers):
    a, b = two
    pa, pb = opened(lockers, a), opened(lockers, b)
    assert pa("setlk 0 wr 0 100") == "ok"
    assert pb("setlk 0 wr 50 10") in CONFLICT
    assert pb("setlk 0 rd 99 1") in CONFLICT
    # F_GETLK names the other mount's lock: its type, range and process.
    assert pb("getlk 0 wr 50 10") == f"ok wr 0 100 {pa.pid}"
    assert pb("getlk 0 rd 200 10").startswith("ok un")
    # Ranges that do not overlap coexist.
    assert pb("setlk 0 wr 100 100") == "ok"
    assert pa("getlk 0 rd 150 1") == f"ok wr 100 100 {pb.pid}"
    assert pa("setlk 0 wr 150 1") in CONFLICT
    # Read locks share; a write lock in their range does not.
    assert pa("setlk 0 rd 300 10") == "ok"
    assert pb("setlk 0 rd 300 10") == "ok"
    assert pb("setlk 0 wr 305 1") in CONFLICT
    # Unlocking part of a range frees that part only.
    assert pa("setlk 0 un 0 50") == "ok"
    assert pb("setlk 0 wr 0 50") == "ok"
    assert pb("setlk 0 wr 50 1") in CONFLICT
    # A lock to the end of the file (length 0) covers any offset past its start.
    assert pa("setlk 0 wr 1000 0") == "ok"
    assert pb("getlk 0 rd 1000000000 1") == f"ok wr 1000 0 {pa.pid}"
    assert pb("setlk 0 rd 5000 1") in CONFLICT


def test_setlkw_waits_until_the_other_mount_unlocks(two, lockers):
    a, b = two
    holder, waiter = opened(lockers, a), opened(lockers, b)
    assert holder("setlk 0 wr 0 0") == "ok"
    waiter.send("setlkw 0 wr 10 10")
    assert waiter.blocked()
    assert holder("setlk 0 un 0 0") == "ok"
    assert waiter.answer(timeout=5) == "ok"
    assert holder("getlk 0 rd 0 0") == f"ok wr 10 10 {waiter.pid}"


def test_closing_any_descriptor_drops_the_process_record_locks(two, lockers):
    a, b = two
    holder = opened(lockers, a, count=2)  # two opens of the file in one process
    other = opened(lockers, b)
    assert holder("setlk 0 wr 0 0") == "ok"
    assert other("setlk 0 wr 0 1") in CONFLICT
    # POSIX: closing the other descriptor (not the one locked through) drops the locks, by
    # the time close() returns.
    assert holder("close 1") == "ok"
    assert other("setlk 0 wr 0 1") == "ok"
    assert other("setlk 0 un 0 0") == "ok"

    # And so does the process's exit: it closes its descriptors.
    assert holder("setlk 0 wr 0 0") == "ok"
    assert other("setlk 0 wr 0 1") in CONFLICT
    holder.kill()
    assert other("setlk 0 wr 0 1") == "ok"


# -- interrupting a waiter ------------------------------------------------------------------------

WAITS = {"flock": ("flock 0 ex", "flock 0 ex,nb"), "fcntl": ("setlkw 0 wr 0 0", "setlk 0 wr 0 0")}


@pytest.mark.parametrize("kind", sorted(WAITS))
def test_a_killed_waiter_exits_and_leaves_no_lock(two, lockers, kind):
    wait, try_lock = WAITS[kind]
    a, b = two
    holder, waiter, other = opened(lockers, a), opened(lockers, b), opened(lockers, b)
    assert holder(try_lock) == "ok"
    waiter.send(wait)
    assert waiter.blocked()
    killed = time.monotonic()
    os.kill(waiter.pid, signal.SIGKILL)
    waiter.proc.wait(timeout=10)  # waitpid: the kernel let it go
    assert time.monotonic() - killed < 3
    assert other(try_lock) != "ok"  # the holder still holds
    holder.kill()
    eventually(other, try_lock)  # and the killed waiter took nothing


@pytest.mark.parametrize("kind", sorted(WAITS))
def test_a_signal_interrupts_a_waiter_with_eintr(two, lockers, kind):
    wait, try_lock = WAITS[kind]
    a, b = two
    holder, waiter = opened(lockers, a), opened(lockers, b)
    assert holder(try_lock) == "ok"
    assert waiter("alarm 0.5") == "ok"
    started = time.monotonic()
    assert waiter(wait, timeout=10) == f"err {errno.EINTR}"
    assert time.monotonic() - started < 3
    # The waiter lives on and gets the lock once it is free.
    assert waiter(try_lock) != "ok"
    holder.kill()
    eventually(waiter, try_lock)
