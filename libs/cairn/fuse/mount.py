"""The mount process: check the mountpoint, open the volume, serve FUSE until unmounted or told
to stop, then flush, close the session and leave no mount behind.

One process serves one mountpoint (pyfuse3 keeps one session per process). It is started
either in the foreground (`serve`) or in the background (`start_background`): the parent
re-executes `cairn mount` as a detached child (its own session, stdio to the log file) with a
pipe, and returns only when the child writes `ready` (the mountpoint answers stat with the new
file system) or an `error <exit code> <message>` line, so the caller gets one line and an exit
code either way. A forked child would inherit the parent's event loop; a fresh interpreter
does not.

Shutdown order on SIGTERM/SIGINT, while requests are still served: syncfs on the mountpoint
(with the writeback cache, the kernel pushes its dirty pages to us), flush every buffered
write into slices, stop the FUSE loop; then unmount (pyfuse3.close) and close the volume
(final flush, session closed: opens and locks released). A second signal skips the flushes.

Every mount writes `<run dir>/<slug>.pid` (its PID) so `cairn umount` and tests find it; the
run dir is $CAIRN_RUN_DIR, else /run/cairn for root, else $XDG_RUNTIME_DIR/cairn or
/tmp/cairn-<uid>. A background mount logs to `<slug>.log` there unless --log says otherwise,
and every mount answers control requests (stats, warmup, flush) on `<slug>.ctl` there
(cairn.fuse.control), and Prometheus scrapes on --metrics-addr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import hashlib
import logging
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cairn.errors import (
    CairnError,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    UnavailableError,
    exit_code,
)
from cairn.threads import in_daemon_thread

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # a background start waits this long for the mount to answer
UNMOUNT_TIMEOUT = 60.0  # `cairn umount` waits this long for the mount process to exit
SYNC_TIMEOUT = 30.0  # syncfs at shutdown: the kernel's dirty pages must reach us by then
STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)  # what a dead FUSE mount answers
GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python: 700)


@dataclass
class MountConfig:
    """Everything `cairn mount` was asked for."""

    meta_url: str
    mountpoint: str
    subdir: str = ""
    read_only: bool = False
    cache_dir: str | None = None
    cache_size: int = 1 << 30
    buffer_size: int = 256 << 20
    # How long the kernel and the VFS trust cached attributes and names. Other mounts'
    # change notes drop them at once, so these only bound staleness when a note is lost.
    attr_timeout: float = 30.0
    entry_timeout: float = 30.0
    writeback_cache: bool = False
    allow_other: bool = False
    max_tasks: int = 128
    log_file: str | None = None
    metrics_addr: str | None = None  # host:port of a Prometheus /metrics endpoint
    kernel_readahead: int = 4 << 20  # the kernel's read-ahead for this mount (0: its default)
    cache_writes: bool = False  # also keep written blocks in the disk cache (a second write)
    outage_wait: float = 60.0  # seconds an operation waits for Redis or the store (then EIO)


# -- where mounts leave their PID and log ----------------------------------------------------


def run_dir() -> Path:
    """Where PID files (and default logs) of mounts live."""
    env = os.environ.get("CAIRN_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/cairn")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "cairn" if xdg else Path(f"/tmp/cairn-{os.getuid()}")


def mount_slug(mountpoint: str) -> str:
    """A file name for a mountpoint: readable, unique (a hash of the absolute path)."""
    path = os.path.abspath(mountpoint)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", path.strip("/"))[-60:] or "root"
    return f"{readable}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def pid_file(mountpoint: str) -> Path:
    return run_dir() / f"{mount_slug(mountpoint)}.pid"


def default_log(mountpoint: str) -> Path:
    return run_dir() / f"{mount_slug(mountpoint)}.log"


def read_pid(mountpoint: str) -> int | None:
    """The PID of the live process that mounted mountpoint, if its PID file names one."""
    try:
        pid = int(pid_file(mountpoint).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def find_mount_pid(mountpoint: str) -> int | None:
    """The PID of the process serving mountpoint: from its PID file, else the live
    `cairn mount` process whose command line names it (a mount started with another run
    dir)."""
    pid = read_pid(mountpoint)
    if pid is not None:
        return pid
    path = os.path.abspath(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if path in argv and b"mount" in argv and any(b"cairn" in a for a in argv[:3]):
            if _alive(int(entry)):
                return int(entry)
    return None


def _write_pid(mountpoint: str) -> Path | None:
    path = pid_file(mountpoint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".tmp{os.getpid()}")
        temp.write_text(f"{os.getpid()}\n")
        os.replace(temp, path)
    except OSError as error:
        log.warning("cannot write PID file %s: %s", path, error.strerror)
        return None
    return path


def _remove_pid(path: Path | None) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(path.read_text().split()[0]) == os.getpid():
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a live mount.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
    return True


# -- the mountpoint ----------------------------------------------------------------------------


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name)
        if found:
            return found
    raise FailedPrecondition("fusermount3 not found: install fuse3 (./run.sh setup)")


def fusermount_unmount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    argv = [_fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def is_mounted(mountpoint: str) -> bool:
    """Whether mountpoint is the target of a mount (from /proc/self/mountinfo, without stat,
    so a dead FUSE mount does not hang or fail the check)."""
    path = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def prepare_mountpoint(mountpoint: str) -> str:
    """The absolute mountpoint, checked: an existing directory that nothing is mounted on.

    A dead FUSE mount left by a killed process (stat answers ENOTCONN) is unmounted lazily
    first, as `fusermount3 -uz` would, so remounting after a crash needs no manual step."""
    path = os.path.abspath(mountpoint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {path} does not exist") from None
    except OSError as error:
        if error.errno not in STALE_ERRNOS:
            raise ConfigError(f"mountpoint {path}: {error.strerror}") from None
        log.warning("mountpoint %s is a dead mount (%s): unmounting it", path, error.strerror)
        result = fusermount_unmount(path, lazy=True)
        if result.returncode != 0:
            raise FailedPrecondition(
                f"mountpoint {path} is a dead mount and fusermount3 -uz failed: "
                f"{_last_line(result.stderr)}"
            ) from None
        try:
            st = os.stat(path)
        except OSError as again:
            raise ConfigError(f"mountpoint {path}: {again.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise FailedPrecondition(f"{path} is already a mount point: unmount it first")
    return path


def fuse_options(config: MountConfig, volume: str) -> set[str]:
    """The mount options handed to libfuse.

    default_permissions: the kernel checks mode bits against the attributes it caches, so
    permission checks cost no round trip (no access() requests) and supplementary groups are
    the kernel's own; the engine still checks again where it must (sticky dirs, owners)."""
    name = re.sub(r"[,\s\\]", "_", volume) or "volume"
    options = {f"fsname=cairn:{name}", "subtype=cairn", "default_permissions"}
    if config.read_only:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    return options


def set_kernel_readahead(mountpoint: str, nbytes: int) -> None:
    """Sets the kernel's read-ahead for the mount (its backing device's read_ahead_kb).

    FUSE starts at 128 KiB, so a sequential reader gets 128 KiB READ requests: each costs
    a round trip through this process. With a few MiB the kernel asks for 1 MiB at a time
    (its request limit), in the background, ahead of the reader. Needs root; otherwise
    the default stays."""
    device = ""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:  # the last entry for the path is the mount just made
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                device = fields[2]
    if not device:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(max(4, nbytes // 1024)))
    except OSError as error:
        log.debug("kernel read-ahead of %s stays at its default: %s", mountpoint, error)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


# -- serving -------------------------------------------------------------------------------------


class _QuietReleaseReplies(logging.Filter):
    """Drops pyfuse3's error line for a release reply the kernel no longer waits for.

    The kernel sends RELEASE without waiting (close(2) already returned after FLUSH, which
    committed the writes); when the file system is unmounted meanwhile, the reply finds
    no request (ENOENT). Nothing is lost and nobody is waiting: it is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("fuse_release") and "No such file or directory" in message:
            log.debug("late release reply: %s", message)
            return False
        return True


def syncfs(path: str) -> None:
    """syncfs(2) on the file system at path, without holding the GIL: with the writeback
    cache the kernel answers it by sending this very process WRITE requests, which the
    event loop must be free to serve (pyfuse3.syncfs keeps the GIL and would deadlock)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


class _Stopper:
    """Turns SIGTERM/SIGINT into an orderly stop of the FUSE loop."""

    def __init__(self, vfs: Any, mountpoint: str) -> None:
        self.vfs = vfs
        self.mountpoint = mountpoint
        self.task: asyncio.Task | None = None
        self.signalled = False

    def request(self, signum: int) -> None:
        import pyfuse3

        name = signal.Signals(signum).name
        if self.task is None:
            log.info("%s: flushing and unmounting %s", name, self.mountpoint)
            self.signalled = True
            self.task = asyncio.create_task(self._stop())
        else:
            log.warning("%s again: stopping without waiting for flushes", name)
            pyfuse3.terminate()

    async def _stop(self) -> None:
        import pyfuse3

        try:
            await asyncio.wait_for(in_daemon_thread(lambda: syncfs(self.mountpoint), "cairn-mount-blocking"), SYNC_TIMEOUT)
        except (OSError, TimeoutError) as error:
            log.warning("syncfs of %s before unmount: %s", self.mountpoint, error)
        try:
            await _flush_all(self.vfs)
        except Exception:
            log.exception("flushing writes before unmount failed")
        pyfuse3.terminate()


async def _flush_all(vfs: Any) -> None:
    await vfs.sync()


async def _announce(mountpoint: str, parent_dev: int, on_ready: Callable[[], None]) -> None:
    """Calls on_ready once the mountpoint answers stat from the new file system."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            st = await in_daemon_thread(lambda: os.stat(mountpoint), "cairn-mount-blocking")
            if st.st_dev != parent_dev:
                break
        except OSError as error:
            log.debug("mountpoint not ready yet: %s", error)
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{mountpoint} did not answer within {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.02)
    on_ready()


def default_cache_dir(meta_url: str) -> str:
    """A disk cache directory per volume (named after its metadata URL)."""
    from cairn.meta.base import safe_url

    digest = hashlib.sha1(safe_url(meta_url).encode()).hexdigest()[:16]
    if os.geteuid() == 0:
        return f"/var/cache/cairn/{digest}"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "cairn", digest)


async def open_vfs(config: MountConfig) -> Any:
    """The VFS of the volume, as the mount uses it."""
    from cairn.vfs import VFS

    cache_dir = None
    if config.cache_size > 0:
        cache_dir = config.cache_dir or default_cache_dir(config.meta_url)
    return await VFS.open_volume(
        config.meta_url,
        cache_dir=cache_dir,
        cache_size=config.cache_size,
        session_info={"mountpoint": config.mountpoint},
        local_disk_cache=config.cache_dir is not None,  # asked for by name: a cache it is
        attr_ttl=config.attr_timeout,
        entry_ttl=config.entry_timeout,
        dir_entry_ttl=config.entry_timeout,
        buffer_size=config.buffer_size,
        read_only=config.read_only,
        subdir=config.subdir,
        outage_wait=config.outage_wait,
    )


async def serve(config: MountConfig, on_ready: Callable[[], None] | None = None) -> int:
    """Mounts the volume and serves it until unmounted or signalled; returns the exit code.

    Raises CairnError (one line) when the mount cannot be made: a bad URL, an unformatted
    volume, an unusable mountpoint, FUSE refusing."""
    import pyfuse3
    import pyfuse3.asyncio

    from cairn.fuse import control
    from cairn.fuse.operations import Operations

    pyfuse3.asyncio.enable()
    logging.getLogger("pyfuse3").addFilter(_QuietReleaseReplies())
    mountpoint = prepare_mountpoint(config.mountpoint)
    parent_dev = os.stat(os.path.dirname(mountpoint) or "/").st_dev
    vfs = await open_vfs(config)
    channel = None
    try:
        ops = Operations(
            vfs,
            attr_timeout=config.attr_timeout,
            entry_timeout=config.entry_timeout,
            writeback_cache=config.writeback_cache,
        )
        # Counters, the control socket and /metrics, before the first request.
        channel = await control.open_channel(vfs, ops, mountpoint, metrics_addr=config.metrics_addr)
        if not config.cache_writes and hasattr(vfs.store, "write_through"):
            vfs.store.write_through = False  # blocks written go to the store only
        volume = vfs.meta.fmt.name
        try:
            pyfuse3.init(ops, mountpoint, fuse_options(config, volume))
        except RuntimeError as error:
            raise FailedPrecondition(f"cannot mount {mountpoint}: {error}") from None
    except BaseException:
        if channel is not None:
            await channel.close()
        await vfs.close()
        raise
    log.info("volume %r mounted at %s (pid %d)", volume, mountpoint, os.getpid())
    _tune_gc()
    _tune_malloc()
    _raise_open_files()
    pidfile = _write_pid(mountpoint)
    loop = asyncio.get_running_loop()
    stopper = _Stopper(vfs, mountpoint)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopper.request, signum)

    def ready() -> None:
        # After the kernel's INIT handshake, which caps read-ahead at what was negotiated.
        if config.kernel_readahead > 0:
            set_kernel_readahead(mountpoint, config.kernel_readahead)
        if on_ready is not None:
            on_ready()

    announce = asyncio.create_task(_announce(mountpoint, parent_dev, ready), name="cairn-announce")
    announce.add_done_callback(_announce_done)
    code = 0
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
    except Exception:
        log.exception("the FUSE loop failed")
        code = 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        announce.cancel()
        await asyncio.gather(announce, return_exceptions=True)
        if stopper.task is not None:
            await asyncio.gather(stopper.task, return_exceptions=True)
        ops.close()
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session failed")
            code = code or 1
        await channel.close()
        _log_stats(vfs)
        try:
            await vfs.close()
        except Exception:
            log.exception("closing the volume failed: writes may be lost")
            code = code or 1
        _remove_pid(pidfile)
    log.info("%s unmounted%s", mountpoint, " after a signal" if stopper.signalled else "")
    return code


def _tune_gc() -> None:
    """Every FUSE request allocates (a coroutine, futures, attributes), so Python's cycle
    collector ran every few hundred requests and, as the caches grew, walked them all each
    time. What exists once the mount is up is frozen out of its sight, and it runs less
    often; Cairn's data structures do not rely on it (no cycles are left to it)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def _raise_open_files(wanted: int = 65536) -> None:
    """A mount keeps object files open (kept descriptors for small reads, block files of
    extents read in C): the soft limit on open files goes up to `wanted`, within the hard
    one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.debug("cannot raise the open files limit to %d: %s", target, error)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def _tune_malloc() -> None:
    """Blocks (4 MiB) are read into fresh buffers all the time. glibc gives allocations that
    large their own mapping and unmaps it on free, so every block paid for page faults,
    zeroed pages and a TLB flush, about a third of a sequential read's CPU. Keeping them in
    the heap (kept up to 512 MiB of free space before it is trimmed) lets the next block
    reuse the last one's memory. Skipped where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value in ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 512 << 20),
                         (M_TOP_PAD, 64 << 20)):  # fmt: skip
        if mallopt(param, value) != 1:
            log.debug("mallopt(%d, %d) refused", param, value)


def _log_stats(vfs: Any) -> None:
    """One line of what the mount did (operation counts, bytes), for the log."""
    try:
        snap = vfs.stats_snapshot()
    except Exception:  # counters are a courtesy: never fail an unmount over them
        log.debug("no VFS stats", exc_info=True)
        return
    ops = " ".join(f"{name}={s['count']}" for name, s in snap["ops"].items())
    log.info("session totals: read %d bytes, wrote %d bytes; ops: %s",
             snap["bytes_read"], snap["bytes_written"], ops)  # fmt: skip


def _announce_done(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        import pyfuse3

        log.error("mount not ready: %s", error)
        with contextlib.suppress(Exception):
            pyfuse3.terminate()


# -- background start ------------------------------------------------------------------------------


class ReadyPipe:
    """The child's end of the start handshake (the fd named by --ready-fd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def ready(self) -> None:
        self._send("ready")

    def failed(self, error: BaseException) -> None:
        if isinstance(error, CairnError):
            self._send(f"error {exit_code(error)} {error}")
        else:
            self._send(f"error 1 {type(error).__name__}: {error}")


def start_background(argv: list[str], mountpoint: str, log_path: Path,
                     timeout: float = READY_TIMEOUT) -> int:  # fmt: skip
    """Starts `cairn <argv>` detached with its output in log_path and waits for its ready line.

    Returns the child's PID once the mount answers; raises a one-line CairnError (after
    stopping the child and removing a half-made mount) otherwise."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cairn.cli.main", *argv, "--ready-fd", str(write_end)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(write_end,),
                start_new_session=True, cwd="/",
            )  # fmt: skip
    finally:
        os.close(write_end)
    try:
        line = _read_ready_line(read_end, proc, timeout)
    finally:
        os.close(read_end)
    if line == "ready":
        return proc.pid
    if line.startswith("error "):
        _, code, message = (line.split(" ", 2) + [""])[:3]
        proc.wait(timeout=30)
        raise _ChildError(message or "the mount failed", int(code) if code.isdigit() else 1)
    # No answer: the child died, or hung.
    if proc.poll() is None:
        _stop_child(proc)
    if is_mounted(mountpoint):
        fusermount_unmount(mountpoint, lazy=True)
    tail = _last_line(_tail(log_path))
    if line == "timeout":
        raise DeadlineExceeded(f"mount of {mountpoint} not ready after {timeout:.0f}s "
                               f"(see {log_path}): {tail}")  # fmt: skip
    raise UnavailableError(f"mount process exited with code {proc.returncode} "
                           f"(see {log_path}): {tail}")  # fmt: skip


class _ChildError(CairnError):
    """The background child's own one-line error, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def child_exit_code(error: BaseException) -> int:
    return error.code if isinstance(error, _ChildError) else exit_code(error)


def _read_ready_line(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    """The first line the child writes, "" if it closed the pipe without one, or "timeout"."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def _stop_child(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# -- unmount ----------------------------------------------------------------------------------------


def unmount(
    mountpoint: str, lazy: bool = False, timeout: float = UNMOUNT_TIMEOUT
) -> tuple[str, int | None]:
    """Unmounts mountpoint (fusermount3 -u, -uz when lazy) and waits for its mount process to
    exit; returns the absolute mountpoint and that process's PID when one was known."""
    path = os.path.abspath(mountpoint)
    pid = find_mount_pid(path)
    if not is_mounted(path):
        if pid is not None:
            raise FailedPrecondition(f"{path} is not mounted, but its mount process {pid} "
                                     "is still running")  # fmt: skip
        raise FailedPrecondition(f"{path} is not mounted")
    result = fusermount_unmount(path, lazy=lazy)
    if result.returncode != 0:
        hint = " (files are open in it: close them, or use --lazy)" if "busy" in (
            result.stderr.lower()) else ""  # fmt: skip
        raise FailedPrecondition(f"cannot unmount {path}: {_last_line(result.stderr)}{hint}")
    if pid is not None:
        wait_exit(pid, timeout)
    return path, pid


def wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"mount process {pid} still running after {timeout:.0f}s")
        time.sleep(0.05)
