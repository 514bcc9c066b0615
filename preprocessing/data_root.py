"""Open a request's path under a data root, and nothing outside it (SPEC §7 ``file`` requests).

``open_under_root`` returns an open file; the loaders (``loaders``, ``scans``) read that file and never
reopen it by name, so what was checked is what is read. It is imported from ``loaders`` as well.
"""

from __future__ import annotations

import errno
import os
import stat

from defectscope.errors import PathNotAllowed

_MAX_SYMLINKS = 40  # the kernel's own limit per path


def open_under_root(root, path: str):
    """``(file, name)``: ``path`` under the directory ``root`` open for reading, and the name relative to
    ``root`` of the file actually opened. ``path`` is relative to ``root`` (or absolute, spelled under it).

    The walk starts from a descriptor of ``root`` and opens one component at a time relative to the
    last, always with ``O_NOFOLLOW``: the kernel never follows a link for us, so nothing outside the root
    is ever opened, whatever is renamed or swapped while we walk. A symbolic link is read and its target
    walked the same way: one that stays under the root is followed, one that leaves it is refused before
    its target is touched. '..' in the request is refused. The caller reads what it needs from the file
    returned and never opens the path again: a check by name followed by an open by name can be two files.
    """
    root, parts = _requested_parts(root, path)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PathNotAllowed(f"the data root cannot be opened: {exc.strerror or exc}") from None
    dirs, names = [root_fd], []
    try:
        return _walk(root, path, parts, dirs, names)
    finally:
        for fd in dirs:
            os.close(fd)


def _requested_parts(root, path: str) -> tuple[str, list[str]]:
    """The real path of ``root`` and the components of ``path`` to walk from it; refuses what cannot be
    walked safely (not a string, a NUL, '..', an absolute path not spelled under the root, no ``dir_fd``)."""
    if not isinstance(path, str) or not path:
        raise PathNotAllowed("the path must be a non-empty string")
    if "\x00" in path:
        raise PathNotAllowed("path contains a NUL byte")
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise PathNotAllowed("file input needs a system that opens files relative to a directory (POSIX)")
    root = os.path.realpath(root)
    parts = path.split("/")
    if ".." in parts:
        raise PathNotAllowed(f"path {path!r} climbs out with '..'")
    if path.startswith("/"):
        parts = _beneath(root, path)
        if parts is None:
            raise PathNotAllowed(f"path {path!r} is outside the data root")
    return root, parts


def _walk(root: str, path: str, parts: list[str], dirs: list[int], names: list[str]):
    """Open ``parts`` one at a time, each relative to the directory ``dirs[-1]``; ``(file, name)`` of the
    regular file at the end. ``dirs`` (descriptors, the root's first) and ``names`` are the directories
    walked so far; the walk pushes and pops them, and the caller closes what is left in ``dirs``."""
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":  # from a link's target: back up the walk, never above the root
            if len(dirs) == 1:
                raise PathNotAllowed(f"path {path!r} leads out of the data root through a symbolic link")
            os.close(dirs.pop())
            names.pop()
            continue
        last = not parts
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
        try:
            fd = os.open(part, flags, dir_fd=dirs[-1])
        except OSError as exc:
            links += 1
            parts[:0] = _link_parts(root, path, part, exc, dirs, names, links)
            continue
        if not last:
            dirs.append(fd)
            names.append(part)
            continue
        return _regular_file(fd, path), "/".join([*names, part])
    raise PathNotAllowed(f"path {path!r} is not a file under the data root")


def _link_parts(root: str, path: str, part: str, exc: OSError, dirs: list[int], names: list[str],
                links: int) -> list[str]:
    """The components to walk in place of ``part``, which did not open with ``O_NOFOLLOW`` (``exc``): its
    target when it is a symbolic link (the ``links``-th of the walk) that stays under the root, else the
    refusal. An absolute target restarts the walk at the root (``dirs``/``names`` cut back to it)."""
    target = _link_target(part, dirs[-1])
    if target is None:
        raise _refusal(path, exc) from None
    if links > _MAX_SYMLINKS:
        raise PathNotAllowed(f"path {path!r} goes through more than {_MAX_SYMLINKS} symbolic links")
    if not target.startswith("/"):
        return target.split("/")
    inside = _beneath(root, target)
    if inside is None:
        raise PathNotAllowed(f"path {path!r} is a symbolic link out of the data root")
    for walked in dirs[1:]:  # an absolute target starts again from the root
        os.close(walked)
    del dirs[1:], names[:]
    return inside


def _regular_file(fd: int, path: str):
    """The open descriptor ``fd`` as a binary file, once it is a regular file (else it is closed)."""
    try:  # a FIFO or a device under the root is no map (O_NONBLOCK: opening a FIFO did not wait)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathNotAllowed(f"path {path!r} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _beneath(root: str, path: str) -> list[str] | None:
    """The components of absolute ``path`` below ``root``, or None when it is not spelled under it."""
    prefix = root.rstrip("/") + "/"
    if path == root:
        return []
    return path[len(prefix):].split("/") if path.startswith(prefix) else None


def _link_target(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:  # not a link (EINVAL) or gone: the open's own error says why
        return None


def _refusal(path: str, exc: OSError) -> PathNotAllowed:
    if exc.errno == errno.ENOENT:
        return PathNotAllowed(f"path {path!r} is not a file under the data root")
    if exc.errno == errno.ENOTDIR:
        return PathNotAllowed(f"path {path!r} goes through something that is not a directory")
    return PathNotAllowed(f"path {path!r} cannot be opened under the data root: {exc.strerror or exc}")
