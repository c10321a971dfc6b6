"""Files of the peer: the working copy in ``data/`` and placing the result at ``-o``.

A download writes into ``data/<name>-<sign>.server``; only a complete,
verified file is linked (or, across filesystems, copied) to a temporary name
beside the output and renamed onto it, so ``-o`` never holds a partial or
unverified file.  These are blocking calls: the engine runs the slow ones in
a thread.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def working_name(output: str, sign: str) -> str:
    base = _UNSAFE.sub("_", os.path.basename(output))[:100] or "download"
    return f"{base}-{sign}.server"


def check_output(output: str) -> str:
    """The absolute output path if dfget may write it; ValueError otherwise."""
    path = os.path.abspath(os.path.expanduser(output))
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {parent} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"output {path} exists and is not writable")
    return path


def open_working_file(path: str) -> int:
    """A new, empty file at ``path``: a new inode, so a late write meant for an
    earlier attempt can never land in this one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_quietly(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def place(source: str, output: str, tag: str) -> None:
    """Atomically put the finished ``source`` at ``output``.

    Hard link when possible (no copy, and the peer keeps serving the same
    inode), else copy; in both cases through a temporary name in the output's
    directory and one ``rename``.
    """
    output = os.path.abspath(output)
    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{tag}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(os.path.dirname(output), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
