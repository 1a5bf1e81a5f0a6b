"""The mounts of the node plugin: one `cairn mount` process per shared volume, bind mounts for
staging (local volumes, the branches of a dataset's tree) and publishing (every volume), and
the watcher that brings a dead mount back.

A shared volume's mount process is started with `cairn mount --background` at the staging
path: it returns once the mount answers, and the process it leaves runs in its own session,
so it outlives a restart of the node plugin. Its PID file goes to the plugin's run directory
(`CAIRN_RUN_DIR`, a short path under /run/cairn: the mount's control socket goes there too),
its log and block cache to the plugin's data directory, one per volume (a dataset's
volume caches in the dataset's directory of its runtime's tier instead).

When a mount process dies (OOM kill, crash), the staging path and every bind of it answer
ENOTCONN. The watcher notices (the PID is gone, or the mount is dead), starts a new process at
the staging path (`cairn mount` clears the dead mount first), then for each published target
detaches the stale bind (umount -l: a pod may hold files open in it) and binds the new mount
again, so the pod's next open works. With mount propagation from the host (kubelet's
Bidirectional/HostToContainer), the new bind reaches the pod's container too.

A dataset of several mounts (tree.py) has its mount process at a hidden directory of the
plugin's data directory instead, and its staging path is a tree: a read-only tmpfs with a
bind per branch. A publish binds that tree recursively; a repair restarts the process, binds
the branches again, then the targets. The tree's root is a private mount, so binds made
below it never propagate to the targets (the plugin rebinds those itself).

Every blocking look at a path (stat on a mount that may hang) runs in a daemon thread with a
timeout, so a stuck FUSE mount never stalls the plugin's event loop or its exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cairn.errors import (
    CairnError,
    ConflictError,
    DeadlineExceeded,
    FailedPrecondition,
    PermanentError,
    UnavailableError,
)
from cairn.events.types import Event, MountRecovered
from cairn.fuse.mount import mount_slug
from cairn.telemetry import propagation
from cairn.telemetry.tracing import tracer
from cairn.threads import call_with_deadline
from cairn_nodeplugin import tree
from cairn_nodeplugin.state import Branch, Table, Target, Volume

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
START_TIMEOUT = 90.0  # `cairn mount --background` waits up to 60 s for the mount to answer
STOP_TIMEOUT = 30.0  # a mount process gets this long to flush and exit after its unmount
STAT_TIMEOUT = 3.0
STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
RETRY_MAX = 30.0  # seconds between repairs of a mount that keeps failing
SECRET_META_URL = "metaurl"  # the NodeStage secret naming a volume's file system
META_ENV = "CAIRN_META_URL"  # how a mount process is given its URL (cairn.cli.mount)
# sysexits codes `cairn mount` ends with (cairn.errors.exit_code)
EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TEMPFAIL = 64, 69, 75


# -- the kernel's mount table ------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str
    root: str = "/"  # the directory of the mounted file system seen here (a bind's source)
    device: str = ""  # major:minor of the file system (a bind has its source mount's)


def mount_table() -> list[MountEntry]:
    """/proc/self/mountinfo, in mount order (a later entry at a path covers earlier ones)."""
    entries = []
    with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if " - " not in line or len(fields) < 10:
                continue
            sep = fields.index("-")
            entries.append(MountEntry(
                mountpoint=_unescape(fields[4]), fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]), options=fields[5],
                root=_unescape(fields[3]), device=fields[2],
            ))  # fmt: skip
    return entries


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounted_at(path: str) -> MountEntry | None:
    """The topmost mount at `path` (no stat: a dead mount is found without hanging)."""
    found = None
    for entry in mount_table():
        if entry.mountpoint == path:
            found = entry
    return found


def is_mounted(path: str) -> bool:
    return mounted_at(path) is not None


def mounts_below(root: str) -> list[str]:
    """Mountpoints at or below `root`, deepest first (the order to unmount them in)."""
    prefix = root.rstrip("/") + "/"
    points = {e.mountpoint for e in mount_table()
              if e.mountpoint == root or e.mountpoint.startswith(prefix)}  # fmt: skip
    return sorted(points, key=lambda p: (-p.count("/"), p))


# -- looking at paths without hanging ---------------------------------------------------------


async def in_thread(fn: Callable[[], Any], seconds: float = STAT_TIMEOUT) -> Any:
    """A blocking call that may hang in a dead FUSE mount; DeadlineExceeded after
    `seconds`."""
    return await call_with_deadline(fn, seconds, "cairn-nodeplugin-stat")


async def path_problem(path: str, seconds: float = STAT_TIMEOUT) -> str:
    """Why `path` does not answer stat ("" when it does)."""
    try:
        await in_thread(lambda: os.stat(path), seconds)
    except DeadlineExceeded:
        return f"{path} does not answer (stat hangs)"
    except OSError as error:
        if error.errno in STALE_ERRNOS:
            return f"{path}: the mount is dead ({error.strerror})"
        return f"{path}: {error.strerror}"
    return ""


async def statvfs(path: str, seconds: float = STAT_TIMEOUT) -> os.statvfs_result:
    return await in_thread(lambda: os.statvfs(path), seconds)


async def realpath(path: str, seconds: float = STAT_TIMEOUT) -> str:
    return await in_thread(lambda: os.path.realpath(path), seconds)


async def make_dir(path: str, mode: int = 0o750) -> None:
    """Creates `path` (and parents); a dead mount already there is detached first."""
    for _ in range(8):
        try:
            await in_thread(lambda: os.makedirs(path, mode=mode, exist_ok=True))
            return
        except OSError as error:
            # A dead mount there answers ENOTCONN to stat, so makedirs sees "exists" and
            # "not a directory" at once.
            if not is_mounted(path):
                raise FailedPrecondition(f"cannot create {path}: {error.strerror}") from None
        log.info("detaching the dead mount at %s", path)
        await unmount(path, lazy=True)
    raise FailedPrecondition(f"cannot create {path}: dead mounts stay there")


async def remove_dir(path: str) -> None:
    """Removes the (empty, unmounted) directory `path`; missing is fine, a non-empty one is
    left in place (something wrote into it while nothing was mounted there)."""
    try:
        await in_thread(lambda: os.rmdir(path))
    except FileNotFoundError:
        return
    except OSError as error:
        log.warning("leaving %s in place: %s", path, error.strerror)


# -- mount and umount -------------------------------------------------------------------------


async def run(*argv: str, seconds: float = 60.0, env: dict[str, str] | None = None,
              ) -> tuple[int, str, str]:  # fmt: skip
    """Runs a command; (exit code, stdout, stderr). The command is killed after `seconds`."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"{argv[0]} did not finish within {seconds:g}s") from None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


async def bind(source: str, target: str, read_only: bool = False) -> None:
    """Bind-mounts `source` at `target`, then makes that bind read-only if asked (a bind
    takes the source's flags; read-only needs a second, remount, step)."""
    code, _, err = await run("mount", "--bind", source, target)
    if code != 0:
        raise FailedPrecondition(f"cannot bind {source} at {target}: {last_line(err)}")
    if not read_only:
        return
    code, _, err = await run("mount", "-o", "remount,bind,ro", target)
    if code != 0:
        await unmount(target, lazy=True)
        raise FailedPrecondition(f"cannot make {target} read-only: {last_line(err)}")


async def unmount(path: str, lazy: bool = False) -> None:
    """Unmounts the topmost mount at `path`; a busy one is detached lazily instead (the
    last open file closes it). Nothing mounted there is fine."""
    if not is_mounted(path):
        return
    code, _, err = await run("umount", *(["-l"] if lazy else []), path)
    if code == 0 or not is_mounted(path):
        return
    if not lazy:
        log.info("unmounting %s: %s; detaching it lazily", path, last_line(err))
        return await unmount(path, lazy=True)
    raise FailedPrecondition(f"cannot unmount {path}: {last_line(err)}")


async def unmount_all(path: str) -> None:
    """Unmounts every mount stacked at `path` (a bind made twice stacks)."""
    for _ in range(16):
        if not is_mounted(path):
            return
        await unmount(path)
    raise FailedPrecondition(f"{path} stays mounted")


async def unmount_tree(path: str) -> None:
    """Unmounts every mount at or below `path`, deepest first (a tree's branches, then its
    root)."""
    for point in mounts_below(path):
        await unmount_all(point)


async def mount_cmd(*argv: str) -> None:
    """`mount` with `argv`; FailedPrecondition with its message when it fails."""
    code, _, err = await run("mount", *argv)
    if code != 0:
        raise FailedPrecondition(f"mount {' '.join(argv)}: {last_line(err)}")


async def bind_tree(source: str, target: str, read_only: bool = False) -> None:
    """Binds `source` and every mount below it at `target` (a tree's branches come along);
    read-only asks each of them to be remounted so (a recursive bind copies their flags)."""
    code, _, err = await run("mount", "--rbind", source, target)
    if code != 0:
        raise FailedPrecondition(f"cannot bind {source} at {target}: {last_line(err)}")
    if not read_only:
        return
    for point in mounts_below(target):
        code, _, err = await run("mount", "-o", "remount,bind,ro", point)
        if code != 0:
            await unmount_tree(target)
            raise FailedPrecondition(f"cannot make {point} read-only: {last_line(err)}")


async def tree_root(path: str, names: list[str]) -> None:
    """The root of a dataset's tree at `path`: a small read-only tmpfs holding a directory
    per branch name. One already there is kept (its missing directories added)."""
    entry = mounted_at(path)
    if entry is None or (entry.fstype, entry.source) != ("tmpfs", tree.TREE_SOURCE):
        await unmount_tree(path)  # a dead mount, or what another kind of staging left
        await make_dir(path)
        size = f"mode=0755,size=64k,nr_inodes={len(names) + 16}"
        await mount_cmd("-t", "tmpfs", "-o", size, tree.TREE_SOURCE, path)
        # Private: a branch bound again here must not reach the targets through
        # propagation (they are bound again by the plugin, and an unmount there would
        # come back here).
        await mount_cmd("--make-private", path)
        entry = mounted_at(path)
    present = set(await in_thread(lambda: os.listdir(path)))  # the tmpfs's own entries
    missing = [n for n in names if n not in present]
    if missing:
        await mount_cmd("-o", "remount,rw", path)
        await in_thread(lambda: [os.mkdir(posixpath.join(path, n), 0o755) for n in missing])
    if missing or entry is None or "ro" not in entry.options.split(","):
        await mount_cmd("-o", "remount,ro", path)


def branches_at(staging: str, source: str) -> list[Branch]:
    """The branches bound below a tree's root at `staging`, read from the mount table (their
    sources as directories of `source`, the directory the tree's mount serves): what a
    restart without the state file knows of a tree."""
    found: dict[str, Branch] = {}
    for entry in mount_table():
        if posixpath.dirname(entry.mountpoint) != staging:
            continue
        inner = entry.root.strip("/")
        path = posixpath.join(source, inner) if inner else source
        found[posixpath.basename(entry.mountpoint)] = Branch(
            posixpath.basename(entry.mountpoint), path, "ro" in entry.options.split(","))  # fmt: skip
    return list(found.values())


# -- processes ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def serves(pid: int, staging: str) -> bool:
    """Whether `pid` is a live `cairn mount` process of `staging` (a PID of a dead mount may
    have been given to another process since: never signal that one)."""
    if not alive(pid):
        return False
    argv = cmdline(pid)
    return "mount" in argv and staging in argv


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


async def wait_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def terminate(pid: int, seconds: float = 10.0) -> None:
    """SIGTERM (a mount process flushes and unmounts), then SIGKILL after `seconds`."""
    for sig, wait in ((signal.SIGTERM, seconds), (signal.SIGKILL, 5.0)):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if await wait_exit(pid, wait):
            return
    log.error("mount process %d does not exit", pid)


def scrub(text: str, url: str) -> str:
    """`text` with `url`'s password taken out (errors about a file system named by secrets)."""
    password = urlsplit(url).password if url else None
    return text.replace(password, "***") if password else text


class MountProcesses:
    """Starts and stops the `cairn mount` processes of shared volumes."""

    def __init__(self, data_dir: Path, cache_size: str = "1G", run: Path | None = None):
        self.logs = data_dir / "mounts"
        self.caches = data_dir / "cache"
        self.trees = data_dir / "datasets"
        self.run_dir = run or short_run_dir(data_dir)
        self.cache_size = cache_size

    def log_path(self, volume_id: str) -> Path:
        return self.logs / f"{volume_id}.log"

    def pid_of(self, staging: str) -> int | None:
        """The live mount process serving `staging`, from its PID file."""
        try:
            pid = int((self.run_dir / f"{mount_slug(staging)}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if serves(pid, staging) else None

    def tree_fs(self, volume_id: str) -> str:
        """Where the mount process of a dataset's tree mounts (pods never see it)."""
        return str(self.trees / volume_id / "fs")

    def cache_path(self, volume_id: str) -> Path:
        """The block cache a volume's mount gets when it names none of its own."""
        return self.caches / volume_id

    async def start(self, volume_id: str, meta_url: str, subdir: str, staging: str,
                    read_only: bool = False, cache_dir: str = "",
                    cache_size: int | None = None) -> int:  # fmt: skip
        """Mounts directory `subdir` of the file system at `staging`; the process's PID.
        The block cache goes to `cache_dir` with `cache_size` bytes when given (a dataset's
        tier), else to the plugin's directory for the volume with the default size.

        `cairn mount` clears a dead mount left at `staging` by a killed process first."""
        for d in (self.logs, self.caches, self.run_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        size = self.cache_size if cache_size is None else str(cache_size)
        # The URL (maybe with a password) goes in the environment, never on the command line
        # (`ps` shows that to every user); `-` tells `cairn mount` to read it from there.
        argv = [sys.executable, "-m", "cairn.cli.main", "mount", "-", staging,
                "--subdir", subdir, "--background", "--allow-other",
                "--log", str(self.log_path(volume_id)),
                "--cache-dir", cache_dir or str(self.cache_path(volume_id)),
                "--cache-size", size]  # fmt: skip
        if read_only:
            argv.append("--read-only")
        env = {**os.environ, "CAIRN_RUN_DIR": str(self.run_dir), META_ENV: meta_url}
        code, out, err = await run(*argv, seconds=START_TIMEOUT, env=env)
        if code != 0:
            raise _start_error(code, scrub(last_line(err or out), meta_url), volume_id)
        pid = self.pid_of(staging) or _pid_from(out)
        if pid is None:
            raise UnavailableError(f"the mount of {volume_id} started but left no PID")
        log.info("volume %s mounted at %s by process %d", volume_id, staging, pid)
        return pid

    async def stop(self, staging: str, pid: int, seconds: float = STOP_TIMEOUT) -> None:
        """Unmounts `staging` and waits for its process to flush and exit (SIGTERM, then
        SIGKILL, when it does not)."""
        if pid and not serves(pid, staging):
            pid = 0  # gone already (and its PID maybe someone else's now)
        entry = mounted_at(staging)
        if entry is not None:
            dead = bool(await path_problem(staging))
            await unmount(staging, lazy=dead)
        if pid and not await wait_exit(pid, seconds):
            log.warning("mount process %d still runs %gs after its unmount", pid, seconds)
            await terminate(pid)
        with contextlib.suppress(OSError):  # the last mount gone: leave nothing in /run
            self.run_dir.rmdir()

    @staticmethod
    def url_of(pid: int) -> str:
        """The META_URL a live `cairn mount` process was started with ("" if none): read
        from its environment (root only), where the plugin put it."""
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return ""
        prefix = META_ENV.encode() + b"="
        for item in raw.split(b"\0"):
            if item.startswith(prefix):
                return item[len(prefix) :].decode(errors="replace")
        return ""

    @staticmethod
    def options_of(pid: int) -> tuple[str, bool]:
        """(--subdir, --read-only) of a live `cairn mount` process."""
        argv = cmdline(pid)
        subdir = ""
        with contextlib.suppress(ValueError, IndexError):
            subdir = argv[argv.index("--subdir") + 1]
        return subdir, "--read-only" in argv

    @staticmethod
    def cache_of(pid: int) -> tuple[str, int | None]:
        """(--cache-dir, --cache-size in bytes) of a live `cairn mount` process started by
        this plugin ("" and None where the command line does not say)."""
        argv = cmdline(pid)
        found: dict[str, str] = {}
        for flag in ("--cache-dir", "--cache-size"):
            with contextlib.suppress(ValueError, IndexError):
                found[flag] = argv[argv.index(flag) + 1]
        size = found.get("--cache-size", "")
        return found.get("--cache-dir", ""), int(size) if size.isdigit() else None


async def _mount_problem(path: str) -> str:
    """Why nothing usable is mounted at `path` ("" when a mount there answers)."""
    if not is_mounted(path):
        return f"{path} is not mounted"
    return await path_problem(path)


def short_run_dir(data_dir: Path) -> Path:
    """The mounts' run directory (PID files, control sockets), one per plugin data directory.
    Short, because a unix socket's path must fit in 107 bytes."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
    base = Path("/run/cairn") if os.geteuid() == 0 else Path(f"/tmp/cairn-{os.getuid()}")
    return base / f"np-{digest}"


def _pid_from(output: str) -> int | None:
    match = re.search(r"\(pid (\d+)", output)
    return int(match.group(1)) if match else None


def _start_error(code: int, message: str, volume_id: str) -> CairnError:
    text = f"cannot mount volume {volume_id}: {message}"
    if code == EXIT_USAGE:
        return FailedPrecondition(text)
    if code in (EXIT_UNAVAILABLE, EXIT_TEMPFAIL):
        return UnavailableError(text)
    return PermanentError(text)


# -- keeping volumes mounted ------------------------------------------------------------------------


def make_local_dir(path: str, mode: int = 0o777) -> None:
    """A local volume's directory (pods run as any user: the volume is theirs alone)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if os.path.islink(path) or not os.path.isdir(path):
            raise FailedPrecondition(f"{path} exists and is not a directory") from None
        return
    os.chmod(path, mode)  # not narrowed by the umask


class Keeper:
    """Keeps the staged volumes of the table mounted: the mount process and binds of each,
    their health, their repair, and the one-at-a-time lock per volume that the CSI calls
    share with the repairs."""

    def __init__(self, table: Table, processes: MountProcesses, events: Any, node_id: str,
                 meta_url: str | None = None, local_root: str = ""):  # fmt: skip
        self.local_root = local_root
        self.table = table
        self.processes = processes
        self.events = events
        self.node_id = node_id
        self.meta_url = meta_url
        self._locks: dict[str, asyncio.Lock] = {}

    # -- locks and events -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, vid: str) -> AsyncIterator[None]:
        """One operation at a time per volume (kubelet's calls and the watcher's repairs)."""
        lock = self._locks.setdefault(vid, asyncio.Lock())
        async with lock:
            yield

    def busy(self, vid: str) -> bool:
        lock = self._locks.get(vid)
        return lock is not None and lock.locked()

    async def emit(self, vid: str, event: Event, trace: dict) -> None:
        """Appends one event to the volume's history; a bus outage only delays it (outbox),
        and an event that cannot be written never fails the mount it reports."""
        for _ in range(5):
            try:
                await self.events.append("volume", vid, [event], trace=trace)
                return
            except ConflictError:
                continue  # another service appended to the volume meanwhile
            except CairnError as error:
                log.warning("could not record %s of volume %s: %s", event.type_name(), vid, error)
                return
        log.warning("could not record %s of volume %s: its events keep changing",
                    event.type_name(), vid)  # fmt: skip

    # -- mounting ------------------------------------------------------------------------------

    async def mount_process(self, volume: Volume) -> int:
        """Starts the volume's mount process at its mountpoint (the staging path, or a tree's
        hidden directory), or adopts the live one already serving it (a process whose record
        was lost)."""
        point = volume.mountpoint
        running = self.processes.pid_of(point)
        if running and is_mounted(point) and not await path_problem(point):
            log.info("volume %s: adopting mount process %d at %s", volume.volume_id, running,
                     point)  # fmt: skip
            return running
        if running:
            await terminate(running)
        if is_mounted(point):
            await unmount(point, lazy=True)  # a dead mount: detach it
        return await self.processes.start(volume.volume_id, volume.meta_url, volume.source,
                                          point, volume.read_only, volume.cache_dir,
                                          volume.cache_size)  # fmt: skip

    async def bind_local(self, volume: Volume) -> None:
        """A local volume's directory, made if missing, bound at its staging path."""
        await in_thread(lambda: make_local_dir(volume.source))
        await make_dir(volume.staging_path)
        await unmount_all(volume.staging_path)
        await bind(volume.source, volume.staging_path, volume.read_only)

    async def build_tree(self, volume: Volume) -> None:
        """A tree's staging path made whole: its root, then each branch bound from the hidden
        mount (one missing or dead bound again, one that answers kept)."""
        if not volume.tree:
            raise FailedPrecondition(
                f"the mounts of dataset volume {volume.volume_id} are unknown since a restart: "
                "it is repaired when kubelet stages it again")  # fmt: skip
        await tree_root(volume.staging_path, [b.name for b in volume.tree])
        for branch in volume.tree:
            where = posixpath.join(volume.staging_path, branch.name)
            if not await self._branch_problem(volume, where):
                continue
            await unmount_all(where)  # a bind of the dead mount
            source = await self._branch_source(volume, branch)
            await bind(source, where, branch.read_only or volume.read_only)

    async def _branch_source(self, volume: Volume, branch: Branch) -> str:
        """Where `branch` is on the tree's hidden mount. NodeStage found real directories
        there; a symlink put on the way since would be followed by the bind, and could lead
        out of the file system: refused."""
        source = tree.bind_source(volume.fs_path, volume.source, branch)
        if await realpath(source) != source:
            raise FailedPrecondition(f"{branch.path} of dataset volume {volume.volume_id} is "
                                     "not a plain directory of the file system")  # fmt: skip
        return source

    async def take_down(self, volume: Volume) -> None:
        """Undoes the staging of a shared volume: a tree's binds and root, then the mount
        process (it flushes and exits), then a tree's hidden directory."""
        if volume.fs_path:
            await unmount_tree(volume.staging_path)
        if volume.kind == "shared":
            await self.processes.stop(volume.mountpoint, volume.pid)
        if volume.fs_path:
            await remove_dir(volume.fs_path)
            await remove_dir(posixpath.dirname(volume.fs_path))

    async def clear_leftover_tree(self, vid: str, staging: str) -> None:
        """What an unrecorded tree of `vid` left (a crash between its mount and its record):
        the tree at `staging`, the process at its hidden directory."""
        entry = mounted_at(staging)
        if entry is not None and entry.source == tree.TREE_SOURCE:
            await unmount_tree(staging)
        point = self.processes.tree_fs(vid)
        pid = self.processes.pid_of(point)
        if pid or is_mounted(point):
            await self.processes.stop(point, pid or 0)
            await remove_dir(point)
            await remove_dir(posixpath.dirname(point))

    async def bind_target(self, volume: Volume, path: str, read_only: bool) -> None:
        await make_dir(path)
        if volume.fs_path:  # a tree: the branches come along, each bound again
            await unmount_tree(path)
            await bind_tree(volume.staging_path, path, read_only or volume.read_only)
            return
        await unmount_all(path)  # a stale bind of a dead mount
        await bind(volume.staging_path, path, read_only or volume.read_only)

    # -- health --------------------------------------------------------------------------------

    async def problem(self, volume: Volume, path: str | None = None) -> str:
        """Why the volume is not usable at its staging path (and at `path`); "" if it is."""
        found = await self.mount_problem(volume)
        if found:
            return found
        if volume.fs_path and not volume.tree:
            return f"the mounts of dataset volume {volume.volume_id} are unknown"
        for where in dict.fromkeys((volume.staging_path, path or volume.staging_path)):
            found = await self.target_problem(volume, where)
            if found:
                return found
        return ""

    async def mount_problem(self, volume: Volume) -> str:
        """Why a shared volume's mount process does not serve it ("" if it does)."""
        if volume.kind == "shared" and not serves(volume.pid, volume.mountpoint):
            return f"mount process {volume.pid} of volume {volume.volume_id} is not running"
        if volume.fs_path:
            return await _mount_problem(volume.fs_path)
        return ""

    async def target_problem(self, volume: Volume, path: str) -> str:
        """Why the volume's mount at `path` (staging path or target; a tree's with its
        branches) does not answer ("" if it does)."""
        found = await _mount_problem(path)
        for branch in volume.tree if volume.fs_path else ():
            if found:
                break
            found = await self._branch_problem(volume, posixpath.join(path, branch.name))
        return found

    async def _branch_problem(self, volume: Volume, where: str) -> str:
        """Why the bind of a tree's branch at `where` is not one of its live mount. A bind
        of a killed mount may still answer stat from the kernel's cached attributes, so it is
        told by its device: not the one mounted at the hidden place now."""
        entry, serving = mounted_at(where), mounted_at(volume.fs_path)
        if entry is None:
            return f"{where} is not mounted"
        if serving is None or entry.device != serving.device:
            return f"{where} is bound from a mount that is gone"
        return await path_problem(where)

    async def broken_targets(self, volume: Volume) -> list[str]:
        """The targets of `volume` whose bind is gone or dead."""
        return [path for path in list(volume.targets)
                if await self.target_problem(volume, path)]  # fmt: skip

    def unrepaired(self) -> list[Volume]:
        """Volumes the watcher tried and failed to repair."""
        return [v for v in self.table if v.problem and v.failures]

    # -- repair --------------------------------------------------------------------------------

    async def check(self, volume: Volume) -> None:
        """One look of the watcher at a volume: repairs a dead mount or a lost bind."""
        if self.busy(volume.volume_id) or time.monotonic() < volume.retry_at:
            return
        problem = await self.problem(volume)
        broken = [] if problem else await self.broken_targets(volume)
        if not problem and not broken:
            if volume.problem:
                log.info("volume %s is healthy again", volume.volume_id)
            volume.problem, volume.failures = "", 0
            return
        with tracer(__name__).start_as_current_span("cairn.nodeplugin.recover") as span:
            span.set_attribute("cairn.volume_id", volume.volume_id)
            async with self.exclusive(volume.volume_id):
                if self.table.get(volume.volume_id) is not volume:
                    return  # unstaged meanwhile
                try:
                    await self.recover(volume, {}, propagation.inject())
                except CairnError as error:
                    volume.problem = str(error)
                    volume.failures += 1
                    delay = min(RETRY_MAX, 0.5 * 2**volume.failures)
                    volume.retry_at = time.monotonic() + delay
                    log.warning("volume %s: repair failed (%s); next try in %.0fs",
                                volume.volume_id, error, delay)  # fmt: skip

    async def recover(self, volume: Volume, secrets: Mapping[str, str], trace: dict) -> None:
        """Brings a staged volume back: a new mount process (shared) or bind (local) at the
        staging path when that is dead or gone (a tree's branches bound again), then every
        target that needs it bound again. Appends MountRecovered when anything was
        repaired."""
        reason = await self.problem(volume)
        old_pid = volume.pid
        remounted = False
        if reason:
            log.warning("volume %s: %s: restoring its mount", volume.volume_id, reason)
            if volume.kind == "shared":
                # A tree whose process serves may only have lost a bind: the process stays,
                # and so do the targets' binds that still answer.
                if not volume.fs_path or await self.mount_problem(volume):
                    await self._restart(volume, secrets)
                    remounted = True
                if volume.fs_path:
                    self.table.save()  # the new PID recorded before the binds
                    await self.build_tree(volume)
            else:
                await self.bind_local(volume)
                remounted = True
            self.table.save()
        broken = set(volume.targets) if remounted else set(await self.broken_targets(volume))
        rebound = []
        for target in list(volume.targets.values()):
            if target.path in broken:
                await self.bind_target(volume, target.path, target.read_only)
                rebound.append(target.path)
        volume.problem, volume.failures, volume.retry_at = "", 0, 0.0
        if not reason and not rebound:
            return
        log.info("volume %s repaired (mount process %d -> %d, %d targets bound again)",
                 volume.volume_id, old_pid, volume.pid, len(rebound))  # fmt: skip
        await self.emit(volume.volume_id, MountRecovered(
            node=self.node_id, staging_path=volume.staging_path, old_pid=old_pid,
            new_pid=volume.pid, targets=rebound), trace)  # fmt: skip

    async def _restart(self, volume: Volume, secrets: Mapping[str, str]) -> None:
        """A new mount process for a shared volume whose mount is dead or gone."""
        if not volume.source:  # rebuilt from events alone, its process gone
            raise FailedPrecondition(
                f"the directory of volume {volume.volume_id} is unknown since a restart:"
                " it is repaired when kubelet stages it again")  # fmt: skip
        volume.meta_url = secrets.get(SECRET_META_URL) or volume.meta_url or (
            self._known_url(volume))  # fmt: skip
        if serves(volume.pid, volume.mountpoint):
            await terminate(volume.pid)  # its mount is dead: the process is stuck
        await make_dir(volume.mountpoint)
        volume.pid = await self.mount_process(volume)

    def _known_url(self, volume: Volume) -> str:
        if volume.meta == "default" and self.meta_url:
            return self.meta_url
        raise FailedPrecondition(
            f"volume {volume.volume_id} lives on a file system named by secrets, which this "
            "plugin no longer knows: it is repaired when kubelet stages it again"
        )

    async def restore(self, store: Any = None, timeout: float = 30.0) -> None:
        """Rebuilds the table after a restart of the plugin: the volumes the event history
        says are staged on this node, with volumes.json as a cache of their details, both
        checked against the mount table and the live mount processes; without the history
        (NATS down), volumes.json and the mount table alone. The watcher then repairs what
        died while the plugin was away."""
        from cairn_nodeplugin import history

        self.table.load()
        cached = dict(self.table.volumes)
        replayed = None
        if store is not None:
            try:
                replayed = await asyncio.wait_for(history.replay(store, self.node_id), timeout)
            except (CairnError, TimeoutError, KeyError, TypeError, ValueError) as error:
                log.warning("cannot read the event history (%s): rebuilding from volumes.json "
                            "and the mount table", error or "no answer")  # fmt: skip
        else:
            log.warning("no event history (NATS is down): rebuilding from volumes.json and "
                        "the mount table")  # fmt: skip
        if replayed is not None:
            volumes: dict[str, Volume] = {}
            for vid, seen in replayed.items():
                volume = cached.get(vid)
                if volume is None or volume.staging_path != seen.staging_path:
                    volume = self._from_history(seen)
                    if volume is None:
                        continue
                for path, read_only in seen.targets.items():
                    volume.targets.setdefault(path, Target(path=path, read_only=read_only))
                volumes[vid] = volume
            for vid, volume in cached.items():  # its events may still wait in the outbox
                if vid not in volumes and (is_mounted(volume.staging_path) or serves(
                        volume.pid, volume.mountpoint)):  # fmt: skip
                    volumes[vid] = volume
            self.table.volumes = volumes
        for volume in self.table:
            self._check_restored(volume)
        self.table.save()
        if len(self.table):
            log.info("serving %d staged volumes again: %s", len(self.table),
                     ", ".join(v.volume_id for v in self.table))  # fmt: skip

    def _from_history(self, seen: Any) -> Volume | None:
        """A volume known only from its events, its details read from the system."""
        staging = seen.staging_path
        entry = mounted_at(staging)
        # A dataset's tree: its root at the staging path, or its process at the hidden place.
        fs_path = self.processes.tree_fs(seen.volume_id)
        if not ((entry is not None and entry.source == tree.TREE_SOURCE)
                or self.processes.pid_of(fs_path)):  # fmt: skip
            fs_path = ""
        point = fs_path or staging
        pid = self.processes.pid_of(point) or (seen.pid if serves(seen.pid, point) else 0)
        volume = Volume(volume_id=seen.volume_id, kind="shared", staging_path=staging,
                        source="", pid=pid, log=str(self.processes.log_path(seen.volume_id)),
                        staged_at=time.time(), fs_path=fs_path)  # fmt: skip
        if pid:
            volume.source, volume.read_only = self.processes.options_of(pid)
            # A dataset's mount caches in its tier: a repair must start it with that cache
            # again (its dataset is known by its handle until kubelet's next NodeStage).
            cache_dir, cache_size = self.processes.cache_of(pid)
            if cache_dir and cache_dir != str(self.processes.cache_path(seen.volume_id)):
                volume.cache_dir, volume.cache_size = cache_dir, cache_size
            if fs_path:
                volume.tree = branches_at(staging, volume.source)
        elif fs_path:
            volume.pid = seen.pid  # its process dead: repaired when kubelet stages it again
        elif seen.node or (entry is not None and not entry.fstype.startswith("fuse")):
            source = seen.path or (os.path.join(self.local_root, seen.volume_id)
                                   if self.local_root else "")  # fmt: skip
            if not source:
                log.warning("volume %s: staged at %s by the events, but where its directory is "
                            "is unknown: dropped", seen.volume_id, staging)  # fmt: skip
                return None
            volume.kind, volume.source, volume.log = "local", source, ""
            volume.read_only = entry is not None and "ro" in entry.options.split(",")
        else:
            volume.source = seen.path  # shared, its process dead: the watcher restarts it
            volume.pid = seen.pid
        log.info("volume %s rebuilt from its event history (%s, staged at %s)",
                 seen.volume_id, volume.kind, staging)  # fmt: skip
        return volume

    def _check_restored(self, volume: Volume) -> None:
        """Live PID and URL of a restored volume; targets no longer there dropped (one not
        mounted whose directory is still there is bound again by the watcher)."""
        if volume.kind == "shared":
            if not serves(volume.pid, volume.mountpoint):
                volume.pid = self.processes.pid_of(volume.mountpoint) or volume.pid
            if serves(volume.pid, volume.mountpoint):
                url = self.processes.url_of(volume.pid)
                if url:
                    volume.meta = "default" if url == self.meta_url else "secret"
                    if volume.meta == "secret":
                        volume.meta_url = url
        for path in list(volume.targets):
            if not is_mounted(path) and not os.path.isdir(path):
                log.info("volume %s: target %s is gone: dropped", volume.volume_id, path)
                del volume.targets[path]

    async def watch(self, interval: float) -> None:
        """The watcher: looks at every staged volume each `interval` seconds."""
        while True:
            await asyncio.sleep(interval)
            for volume in self.table:
                try:
                    await self.check(volume)
                except Exception:  # the watcher must keep watching
                    log.exception("checking volume %s failed", volume.volume_id)
