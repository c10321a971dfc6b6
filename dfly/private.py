"""Owner-only directories and files: what dfly writes is no other local user's to read.

A supernode's cache holds blobs fetched with a caller's credentials, its
``.meta`` files their URLs; a peer home holds the local API token and the
files being downloaded.  So every directory dfly creates is 0700 and every
file 0600, whatever the umask (a umask only takes bits away, so these modes
hold under 022 as under 077).

An existing home is tightened at start: the home and the directories dfly
makes in it (`tighten`) become 0700 again.  Nothing is walked recursively:
files an older dfly left world-readable keep their mode, but sit in a
directory nobody else may enter, and a user's own files (a ``--home`` that
is an existing directory with other things in it) are not touched.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

log = Logger(namespace="dfly")

#: Mode of every directory dfly creates.
PRIVATE_DIR = 0o700
#: Mode of every file dfly creates.
PRIVATE_FILE = 0o600


def make_private_dirs(path: str) -> str:
    """Create ``path`` and any missing parents, each 0700 (unlike `os.makedirs`, whose parents follow the umask).

    Directories that exist already are left as they are: see `private_dir`.
    """
    missing = []
    here = os.path.abspath(path)
    while not os.path.isdir(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile (another thread or process): tightened by whoever owns it
        os.chmod(directory, PRIVATE_DIR)  # a umask such as 0o277 would have taken the owner's bits too
    return path


def private_dir(path: str) -> str:
    """``path`` as a 0700 directory: created so, or tightened when it exists with other bits.

    For the home and the directories dfly itself makes in it.  A directory
    we may not chmod (another user's, a volume mounted read-only) is kept as
    it is, with a warning: the start goes on, as it did before.
    """
    make_private_dirs(path)
    current = stat.S_IMODE(os.stat(path).st_mode)
    if current != PRIVATE_DIR:
        try:
            os.chmod(path, PRIVATE_DIR)
        except OSError as e:
            log.warn("cannot make {path} owner-only (mode {mode:o}): {reason}", path=path, mode=current,
                     reason=e.strerror or e)
    return path


def open_private(path: str, flags: int) -> int:
    """`os.open` with ``O_CREAT``: a new file is 0600 (an existing one keeps its mode)."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
