"""A dataset of several mounts, served to pods as one tree: the pure parts.

cairn-cache-syncer's PV of a dataset lists its mounts (volume_context `mounts`, JSON
[{name, path, read_only, volume}]). With one mount the dataset's volume is a shared volume of
that directory, as before trees. With several, the node plugin (node.py, mounts.py) runs one
`cairn mount` of the mounts' lowest common directory at a hidden place of its own
(`<data>/datasets/<volume id>/fs`), and makes the staging path a tree: a small read-only
tmpfs with a directory per mount name, each a bind of that mount's directory of the hidden
mount. Pods see exactly the mounts, by name, and nothing else of the file system.

Here: the branches parsed and checked (names are directory names, unique; paths plain),
their common directory, where a branch lies on the hidden mount, and where a path of the
dataset's tree (a warm-up's "/" or "/<name>/sub") lies in the file system.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from typing import Any

from cairn.errors import InvalidArgument, NotFound
from cairn_nodeplugin.state import Branch

NAME_MAX = 255  # bytes of one path component
# The source the tree's tmpfs is mounted with: how the mount table tells a tree's root from
# anything else at a staging path (after a restart of the plugin without its state file).
TREE_SOURCE = "cairn-dataset"


def check_name(name: Any) -> str:
    """A branch's name: one path component (pods see it as a directory of the tree)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"mount name {str(name)[:64]!r} is not a directory name")
    if len(name.encode()) > NAME_MAX:
        raise InvalidArgument(f"mount name {name[:32]!r}... is longer than {NAME_MAX} bytes")
    return name


def check_path(path: Any) -> str:
    """A branch's directory of the file system: absolute, normalised, not the root."""
    if (not isinstance(path, str) or not path.startswith("/") or path == "/"
            or posixpath.normpath(path) != path or "\0" in path):  # fmt: skip
        raise InvalidArgument(f"mount path {str(path)[:128]!r} is not a plain absolute path")
    return path


def parse_branches(raw: Any) -> list[Branch]:
    """The branches of a dataset's `mounts` (JSON text, or the list itself as events carry
    it). [] for one mount or none: such a dataset is served as a plain shared volume.
    InvalidArgument for an entry that cannot be a branch, or two of one name."""
    if isinstance(raw, str):
        if not raw.strip():
            return []
        try:
            raw = json.loads(raw)
        except ValueError:
            raise InvalidArgument("volume_context mounts is not JSON") from None
    if not isinstance(raw, list | tuple):
        raise InvalidArgument("mounts is not a list of {name, path, read_only}")
    if len(raw) < 2:
        return []
    branches = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidArgument(f"mount {i} is not an object {{name, path, read_only}}")
        read_only = item.get("read_only", True)
        if not isinstance(read_only, bool):
            raise InvalidArgument(f"mount {i}: read_only {str(read_only)[:16]!r} is no boolean")
        branches.append(Branch(check_name(item.get("name")), check_path(item.get("path")),
                               read_only))  # fmt: skip
    check_unique(branches)
    return branches


def check_unique(branches: Iterable[Branch]) -> None:
    """InvalidArgument when two branches would be one directory of the tree."""
    seen: set[str] = set()
    for branch in branches:
        if branch.name in seen:
            raise InvalidArgument(f"two mounts are named {branch.name!r}")
        seen.add(branch.name)


def common_dir(branches: Iterable[Branch]) -> str:
    """The lowest directory holding every branch: what the tree's one mount serves."""
    return posixpath.commonpath([b.path for b in branches])


def relative(base: str, path: str) -> str:
    """`path` as seen from directory `base` ("" for `base` itself)."""
    if path == base:
        return ""
    prefix = base.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise InvalidArgument(f"{path} is not below {base}")
    return path[len(prefix) :]


def bind_source(fs_path: str, base: str, branch: Branch) -> str:
    """Where `branch` is on the tree's mount of directory `base` at `fs_path`."""
    inner = relative(base, branch.path)
    return posixpath.join(fs_path, inner) if inner else fs_path


def dataset_places(branches: Iterable[Branch], path: str) -> list[tuple[Branch, str]]:
    """Where path `path` of the dataset's tree lies: [(its branch, the path inside that
    branch's directory, "" for all of it)]; every branch for "/". NotFound for a name that
    is no branch; InvalidArgument for a path that is no plain path inside the tree."""
    if not path.startswith("/") or ".." in path.split("/"):
        raise InvalidArgument(f"{path!r} is not a path inside the dataset")
    parts = [p for p in posixpath.normpath(path).split("/") if p]
    if not parts:
        return [(branch, "") for branch in branches]
    for branch in branches:
        if branch.name == parts[0]:
            return [(branch, "/".join(parts[1:]))]
    raise NotFound(f"the dataset has no mount named {parts[0]!r}")
