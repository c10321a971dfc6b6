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
import unicodedata
from urllib.parse import unquote, urlsplit

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def working_name(output: str, sign: str) -> str:
    base = _UNSAFE.sub("_", os.path.basename(output))[:100] or "download"
    return f"{base}-{sign}.server"


def name_from_url(url: str) -> str:
    """The file name dfget saves ``url`` as without ``-o``; ValueError says why there is none.

    The URL's author picks this name, not the user, so it may only ever be a
    plain name in the working directory: the last non-empty path segment
    (Dragonfly's default), percent-decoded, and of that only what follows
    the last ``/`` or ``\\`` (``~%2F.ssh%2Fauthorized_keys`` is
    ``authorized_keys``, ``..%2F..%2Fx`` is ``x``).  Refused rather than
    repaired: no name at all, ``.`` and ``..``, a leading ``~`` (it would
    read as a home directory) or ``-`` (as an option to the next command),
    and control characters, NUL included.  The caller must not expand ``~``
    in it either.
    """
    segments = [s for s in urlsplit(url).path.split("/") if s]
    decoded = unquote(segments[-1]) if segments else ""
    name = re.split(r"[/\\]", decoded)[-1]
    if not name:
        raise ValueError("the URL has no file name to save as: give -o FILE")
    shown = repr(name)  # repr escapes what a terminal would obey
    if name in (".", ".."):
        raise ValueError(f"the URL's file name {shown} is no file name: give -o FILE")
    if name[0] in "~-":
        raise ValueError(f"the URL's file name {shown} starts with {name[0]!r}: give -o FILE to save it anyway")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ValueError(f"the URL's file name {shown} has a control character: give -o FILE")
    return name


def check_new_output(output: str) -> str:
    """`check_output` for a name the URL chose: the file must not exist yet.

    Without ``-o`` the user has not said which file to replace, so an
    existing one (or a symlink, even a dangling one) is kept; ``-o`` is how
    to overwrite it.
    """
    path = check_output(output)
    if os.path.lexists(path):
        raise ValueError(f"output {path} exists: give -o {os.path.basename(path)} to overwrite it")
    return path


def check_output(output: str) -> str:
    """The absolute output path if dfget may write it; ValueError otherwise.

    ``~`` is not expanded here: only the CLI may, and only for a ``-o`` the
    user typed (see `name_from_url`).
    """
    path = os.path.abspath(output)
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
    directory and one ``rename``.  The copy's temporary file is created
    exclusively and without following links: whoever else can write the
    output's directory could plant a symlink at that name after the stale
    one is removed, and a plain ``open`` would then write through it.  Such
    a name makes ``place`` fail (FileExistsError) rather than write.  The
    copy ends with the working file's permission bits, as the link shares
    them.
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
            with open(source, "rb") as src:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fchmod(fd, os.fstat(src.fileno()).st_mode & 0o777)
                    os.fsync(fd)
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
