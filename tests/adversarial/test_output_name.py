"""``dfget`` without ``-o``: a hostile URL must not choose where the file goes.

The name dfget saves as comes from the URL's last path segment, which the
URL's author controls: ``~%2F.ssh%2Fauthorized_keys`` or ``..%2F..%2Fx``
once decoded are paths, not names.  These tests run the real CLI (a
``python3 -m dfly.peer.cli`` process with its own working directory and
``HOME``, or its option parser in this process) and check where a file may
land, what is refused before any network traffic, and that a file already
there is only replaced when the user asked for it with ``-o``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import static
from twisted.web.resource import Resource
from twisted.web.server import Site

from dfly.peer import cli
from tests.loopback import ClosingFactory
from tests.test_bad_input import RecordingEngine, download_body, local_api, post_download

#: The checkout under test: a child ``python3 -m dfly.peer.cli`` must import
#: this tree's dfly, not whichever one is installed.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: No supernode and no source answer here: a refusal must come before any traffic.
UNUSED = "http://127.0.0.1:1"


class Sandbox:
    """A working directory and a ``HOME`` of its own for one dfget run."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        root = os.path.abspath(testcase.mktemp())
        self.cwd = os.path.join(root, "work")
        self.home = os.path.join(root, "home")
        self.dfly_home = os.path.join(self.home, ".small-dragonfly")
        os.makedirs(self.cwd)
        # ``~/.ssh`` exists, as it does for real users: a path into it is writable.
        os.makedirs(os.path.join(self.home, ".ssh"))
        testcase.addCleanup(self.stop_daemon)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["HOME"] = self.home
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT, env.get("PYTHONPATH")]))
        return env

    def args(self, *args: str) -> list[str]:
        return ["-m", "dfly.peer.cli", "--home", self.dfly_home, "--node", "127.0.0.1:1", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """dfget in a child process, to its end (refusals need no reactor)."""
        return subprocess.run([sys.executable, *self.args(*args)], cwd=self.cwd, env=self.env(),
                              capture_output=True, text=True, timeout=60)

    def files(self) -> list[str]:
        """Every file and directory under the sandbox, relative to it, but dfly's own home."""
        root = os.path.dirname(self.cwd)
        found = []
        for directory, dirs, names in os.walk(root):
            if directory == self.home and ".small-dragonfly" in dirs:
                dirs.remove(".small-dragonfly")
            found += [os.path.relpath(os.path.join(directory, n), root) for n in dirs + names]
        return sorted(found)

    def stop_daemon(self) -> None:
        """The peer daemon a run started, if any (it would outlive the test)."""
        try:
            with open(os.path.join(self.dfly_home, "meta", "host.meta")) as f:
                os.kill(json.load(f)["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass


class DerivedNameTests(SynchronousTestCase):
    """Where the option parser puts the output when no ``-o`` is given."""

    def setUp(self) -> None:
        self.box = Sandbox(self)
        previous = os.getcwd()
        os.chdir(self.box.cwd)
        self.addCleanup(os.chdir, previous)
        self.patch(os, "environ", {**os.environ, "HOME": self.box.home})

    def output(self, url: str) -> str:
        options = cli.Options()
        options.parseOptions(["-u", url, "--node", "127.0.0.1:1"])
        return options["request"].output

    def test_encoded_slashes_leave_only_the_base_name(self) -> None:
        """``~%2F.ssh%2Fauthorized_keys`` saves as ./authorized_keys, not ~/.ssh/authorized_keys."""
        self.assertEqual(self.output(f"{UNUSED}/~%2F.ssh%2Fauthorized_keys"),
                         os.path.join(self.box.cwd, "authorized_keys"))

    def test_encoded_dot_dot_slashes_stay_in_the_working_directory(self) -> None:
        """``..%2F..%2Fx`` saves as ./x."""
        self.assertEqual(self.output(f"{UNUSED}/..%2F..%2Fx"), os.path.join(self.box.cwd, "x"))

    def test_encoded_backslashes_leave_only_the_base_name(self) -> None:
        """``..%5C..%5Cx`` saves as ./x: a backslash separates too."""
        self.assertEqual(self.output(f"{UNUSED}/..%5C..%5Cx"), os.path.join(self.box.cwd, "x"))

    def test_last_non_empty_segment_is_the_name(self) -> None:
        """``http://h/dir/`` saves as ./dir, as Dragonfly's basename of the path did."""
        self.assertEqual(self.output(f"{UNUSED}/dir/"), os.path.join(self.box.cwd, "dir"))

    def test_user_given_tilde_output_is_expanded(self) -> None:
        """``-o ~/x`` is the user's own choice: it still means $HOME/x."""
        options = cli.Options()
        options.parseOptions(["-u", f"{UNUSED}/f", "-o", "~/x", "--node", "127.0.0.1:1"])
        self.assertEqual(options["request"].output, os.path.join(self.box.home, "x"))


class RefusedNameTests(SynchronousTestCase):
    """Names dfget refuses to derive: exit 2, one error line, nothing written anywhere."""

    def assertRefused(self, url: str, reason: str) -> None:
        box = Sandbox(self)
        before = box.files()
        done = box.run("-u", url)
        self.assertEqual(done.returncode, 2, done.stdout + done.stderr)
        first = done.stderr.splitlines()[0]
        self.assertTrue(first.startswith("dfget: error: "), done.stderr)
        self.assertIn(reason, first)
        self.assertIn("-o", first)
        # Refused while parsing the options: no home, no daemon, no output.
        self.assertEqual((box.files(), os.path.exists(box.dfly_home)), (before, False))

    def test_encoded_dot_dot_is_refused(self) -> None:
        """``%2E%2E`` decodes to ``..``: no name to save as."""
        self.assertRefused(f"{UNUSED}/%2E%2E", "'..'")

    def test_name_ending_in_an_encoded_slash_is_refused(self) -> None:
        """``a%2F`` decodes to ``a/``, whose base name is empty."""
        self.assertRefused(f"{UNUSED}/a%2F", "no file name")

    def test_name_starting_with_tilde_is_refused(self) -> None:
        """``~x`` could name another user's home: refused, never expanded."""
        self.assertRefused(f"{UNUSED}/~x", "'~x'")

    def test_name_starting_with_dash_is_refused(self) -> None:
        """``-rf`` would read as an option to the next command that sees it."""
        self.assertRefused(f"{UNUSED}/-rf", "'-rf'")

    def test_name_with_a_control_character_is_refused(self) -> None:
        """An ESC in the name would reach terminals and logs."""
        self.assertRefused(f"{UNUSED}/x%1B%5B2Jy", "control character")

    def test_name_with_nul_is_refused(self) -> None:
        """A NUL cannot be in a file name."""
        self.assertRefused(f"{UNUSED}/x%00y", "control character")

    def test_url_without_a_path_is_refused(self) -> None:
        """``http://h/`` has no last segment: dfget asks for -o (no default name)."""
        self.assertRefused(f"{UNUSED}/", "no file name")

    def test_existing_file_is_not_overwritten_without_o(self) -> None:
        """A file already at the URL's name is kept: -o is how to replace it."""
        box = Sandbox(self)
        existing = os.path.join(box.cwd, "f.bin")
        with open(existing, "wb") as f:
            f.write(b"mine")
        done = box.run("-u", f"{UNUSED}/f.bin")
        self.assertEqual(done.returncode, 2, done.stdout + done.stderr)
        first = done.stderr.splitlines()[0]
        self.assertIn("exists", first)
        self.assertIn("-o", first)
        with open(existing, "rb") as f:
            self.assertEqual(f.read(), b"mine")


class AnyName(Resource):
    """An origin that serves the same file at every one-segment path, however odd."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def getChild(self, path: bytes, request: Any) -> Resource:
        return static.File(self.path)


class RealDownloadTests(TestCase):
    """dfget against a real origin (no supernode answers: it downloads from the source)."""

    timeout = 60

    def setUp(self) -> None:
        self.box = Sandbox(self)
        self.data = os.urandom(100_000)
        origin_file = os.path.abspath(self.mktemp())
        with open(origin_file, "wb") as f:
            f.write(self.data)
        factory = ClosingFactory(Site(AnyName(origin_file)))
        origin = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(origin.stopListening)
        self.origin = f"http://127.0.0.1:{origin.getHost().port}"

    async def dfget(self, *args: str) -> tuple[str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, self.box.args(*args), env=self.box.env(), path=self.box.cwd)
        return (out + err).decode(errors="replace"), code

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    async def test_encoded_path_name_is_saved_in_the_working_directory(self) -> None:
        """``~%2F.ssh%2Fauthorized_keys`` writes ./authorized_keys; ~/.ssh stays empty."""
        shown, code = await self.dfget("-u", f"{self.origin}/~%2F.ssh%2Fauthorized_keys")
        self.assertEqual(code, 0, shown)
        self.assertEqual(os.listdir(os.path.join(self.box.home, ".ssh")), [])
        self.assertEqual(self.read(os.path.join(self.box.cwd, "authorized_keys")), self.data)

    async def test_existing_file_is_left_unchanged_without_o(self) -> None:
        """With a real origin too, the file at the URL's name keeps its bytes."""
        existing = os.path.join(self.box.cwd, "f.bin")
        with open(existing, "wb") as f:
            f.write(b"mine")
        shown, code = await self.dfget("-u", f"{self.origin}/f.bin")
        self.assertEqual((code, self.read(existing)), (2, b"mine"), shown)

    async def test_existing_file_is_overwritten_with_o(self) -> None:
        """``-o f.bin`` replaces the file there, as it always did."""
        existing = os.path.join(self.box.cwd, "f.bin")
        with open(existing, "wb") as f:
            f.write(b"mine")
        shown, code = await self.dfget("-u", f"{self.origin}/f.bin", "-o", "f.bin")
        self.assertEqual((code, self.read(existing)), (0, self.data), shown)


class LocalApiOutputTests(SynchronousTestCase):
    """The daemon never derives a name: its local API takes absolute outputs only."""

    def assertRefused(self, output: str) -> None:
        engine = RecordingEngine()
        status, body = post_download(self, local_api(engine), download_body(f"{UNUSED}/f", output=output))
        self.assertEqual((status, engine.requests), (400, []), body)
        self.assertIn(b"absolute", body)

    def test_relative_output_is_refused(self) -> None:
        """``output: "x"`` (relative to the daemon's directory, not the user's) is 400."""
        self.assertRefused("x")

    def test_tilde_output_is_refused_not_expanded(self) -> None:
        """``output: "~/.ssh/authorized_keys"`` is 400: the daemon expands nothing."""
        self.assertRefused("~/.ssh/authorized_keys")

    def test_dot_dot_output_is_refused(self) -> None:
        """``output: "../x"`` is 400."""
        self.assertRefused("../x")
