"""What dfly leaves on disk for other local users, and what its errors tell a client.

A supernode caches private blobs (fetched with a caller's credentials) and a
peer home holds the local API token: neither may be readable by another user
of the host, whatever the umask (tests run under 022, the usual default).
Errors a client did not cause are a 500 ``internal error``: the exception's
text (often a path under the home) and the traceback go to the log only.

The supernode runs for real (``build_service``, sockets on 127.0.0.1) where
the files are checked; errors are forced through collaborators subclassed to
fail the way a bug or a vanished file would, never by replacing a handler.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from dfly.config import Home
from dfly.logs import open_log
from dfly.peer import resume
from dfly.supernode import tap
from dfly.supernode.cdn import CdnCache
from tests.test_integration import IntegrationTestCase

def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def use_umask(testcase: Any, umask: int = 0o022) -> None:
    """Run the test under ``umask`` (the usual default), restored afterwards."""
    old = os.umask(umask)
    testcase.addCleanup(os.umask, old)


def current_umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


# --- the supernode's home ---------------------------------------------------------


class SupernodeHomeModeTests(IntegrationTestCase):
    """A real supernode with one task cached: nothing in its home is readable by others."""

    def setUp(self) -> None:
        use_umask(self)
        super().setUp()

    async def cache_one(self) -> tuple[str, str]:
        """Start the supernode, download one file through it; (data file, meta) of its cache entry."""
        served = self.serve("private.bin", os.urandom(5000))
        await self.start_supernode()
        result = await self.download(self.request(served.url))
        self.assertTrue(result.success, result.line())
        cache = CdnCache(self.supernode_home)
        tid = self.registered()["taskId"]
        return cache.data_path(tid), cache.meta_path(tid)

    async def test_home_is_0700(self) -> None:
        """The home the supernode creates is owner-only."""
        await self.cache_one()
        self.assertEqual(mode(self.supernode_home), 0o700)

    async def test_directories_inside_the_home_are_0700(self) -> None:
        """logs/, repo/, repo/download/ and the entry's prefix directory are owner-only."""
        data, _ = await self.cache_one()
        home = self.supernode_home
        dirs = [os.path.join(home, "logs"), os.path.join(home, "repo"), os.path.join(home, "repo", "download"),
                os.path.dirname(data)]
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})

    async def test_cached_data_file_is_0600(self) -> None:
        """The cached bytes of a task are owner-only."""
        data, _ = await self.cache_one()
        self.assertEqual(mode(data), 0o600)

    async def test_cached_meta_is_0600(self) -> None:
        """The task's .meta (its URL) is owner-only."""
        _, meta = await self.cache_one()
        self.assertEqual(mode(meta), 0o600)

    async def test_supernode_log_is_0600(self) -> None:
        """logs/supernode.log is created owner-only."""
        await self.cache_one()
        self.assertEqual(mode(os.path.join(self.supernode_home, "logs", "supernode.log")), 0o600)

    async def test_existing_0755_home_is_tightened(self) -> None:
        """A home (and dfly's directories in it) left 0755 by an older dfly is 0700 after a start."""
        home = self.supernode_home
        dirs = [home, os.path.join(home, "logs"), os.path.join(home, "repo"), os.path.join(home, "repo", "download")]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        await self.start_supernode()
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})


class SupernodeTapUmaskTests(TestCase):
    """``twistd supernode`` opens its ``-l`` log after makeService: by then no new file is readable by others."""

    async def test_make_service_masks_group_and_other_bits(self) -> None:
        """After makeService the umask keeps group and other out (twistd's own log included)."""
        use_umask(self)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("")
        options = tap.Options()
        options.parseOptions(["--config", config, "--home", os.path.abspath(self.mktemp()), "--port", "0",
                              "--download-port", "0", "--listen", "127.0.0.1"])
        service = tap.makeService(options)
        service.startService()
        await service.stopService()
        self.assertEqual(current_umask() & 0o077, 0o077)


# --- the peer's home ----------------------------------------------------------------


class PeerHomeModeTests(SynchronousTestCase):
    """The peer home (``~/.small-dragonfly``): owner-only, also when it existed before."""

    def setUp(self) -> None:
        use_umask(self)

    def test_existing_0755_peer_home_is_tightened(self) -> None:
        """Home.ensure() makes an existing 0755 root, logs/, meta/ and data/ owner-only."""
        root = os.path.abspath(self.mktemp())
        dirs = [root] + [os.path.join(root, name) for name in ("logs", "meta", "data")]
        for d in dirs:
            os.makedirs(d)
            os.chmod(d, 0o755)
        Home(root).ensure()
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})

    def test_new_log_file_is_0600(self) -> None:
        """dfly's log files (dfclient.log, dfserver.log, ...) are created owner-only."""
        home = Home(os.path.abspath(self.mktemp())).ensure()
        open_log(home.log_file("dfserver.log")).close()
        self.assertEqual(mode(home.log_file("dfserver.log")), 0o600)

    def test_log_directory_open_log_creates_is_0700(self) -> None:
        """A log directory that open_log has to create is owner-only."""
        path = os.path.join(os.path.abspath(self.mktemp()), "logs", "dfdaemon.log")
        open_log(path).close()
        self.assertEqual(mode(os.path.dirname(path)), 0o700)

    def test_resume_record_is_0600(self) -> None:
        """A download's resume record (its identity and piece digests) is owner-only."""
        home = Home(os.path.abspath(self.mktemp())).ensure()
        working = os.path.join(home.data, "f-0123456789abcdef.server")
        resume.save(working, b"{}")
        self.assertEqual(mode(resume.record_path(working)), 0o600)
