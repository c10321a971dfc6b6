"""Tests for dfly.peer.storage: working names, output checks, placing and digests."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dfly.peer import storage
from dfly.peer.storage import check_output, place, working_name
from dfly.pieces import file_digest


class WorkingNameTests(SynchronousTestCase):
    def test_uses_basename_and_sign(self) -> None:
        """The working file is '<basename>-<sign>.server'."""
        self.assertEqual(working_name("/tmp/out/file.iso", "12-3.456"), "file.iso-12-3.456.server")

    def test_unsafe_characters_are_replaced(self) -> None:
        """Spaces, quotes and other odd characters become underscores."""
        self.assertEqual(working_name("/x/my file$(1).tar", "s"), "my_file__1_.tar-s.server")

    def test_non_ascii_is_replaced(self) -> None:
        """Non-ASCII letters become underscores."""
        self.assertEqual(working_name("café", "s"), "caf_-s.server")

    def test_name_never_contains_a_separator(self) -> None:
        """Whatever the output, the working name stays inside data/."""
        self.assertNotIn(os.sep, working_name("../../etc/passwd", "s"))

    def test_empty_basename_gets_a_default(self) -> None:
        """An output ending in a slash still gets a usable name."""
        self.assertEqual(working_name("/tmp/dir/", "s"), "download-s.server")

    def test_long_names_are_truncated(self) -> None:
        """The base is cut to 100 characters so the name fits any filesystem."""
        self.assertEqual(working_name("a" * 300, "s"), "a" * 100 + "-s.server")


class CheckOutputTests(SynchronousTestCase):
    def test_returns_absolute_path(self) -> None:
        """A writable output in an existing directory comes back absolute."""
        directory = self.mktemp()
        os.mkdir(directory)
        output = os.path.join(directory, "out.bin")
        self.assertEqual(check_output(output), os.path.abspath(output))

    def test_existing_writable_file_is_accepted(self) -> None:
        """An existing file may be overwritten."""
        output = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "wb"):
            pass
        self.assertEqual(check_output(output), output)

    def test_directory_is_rejected(self) -> None:
        """The output must not be a directory."""
        directory = self.mktemp()
        os.mkdir(directory)
        error = self.assertRaises(ValueError, check_output, directory)
        self.assertIn("is a directory", str(error))

    def test_missing_parent_is_rejected(self) -> None:
        """The output's directory must exist; dfget does not create it."""
        output = os.path.join(self.mktemp(), "missing", "out.bin")
        error = self.assertRaises(ValueError, check_output, output)
        self.assertIn("does not exist", str(error))

    def test_unwritable_parent_is_rejected(self) -> None:
        """A directory dfget may not write to is rejected up front."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o755)
        if os.geteuid() == 0:
            # root passes every os.access check whatever the mode bits, so the
            # read-only directory above is writable for us.  Emulate what an
            # ordinary user sees by making os.access honour the mode bits for
            # this one directory.
            self._deny_write(directory)
        error = self.assertRaises(ValueError, check_output, os.path.join(directory, "out.bin"))
        self.assertIn("not writable", str(error))

    def test_unwritable_existing_file_is_rejected(self) -> None:
        """An existing output dfget may not overwrite is rejected up front."""
        output = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "wb"):
            pass
        os.chmod(output, 0o444)
        if os.geteuid() == 0:
            # As above: root may write any file, so emulate an ordinary user.
            self._deny_write(output)
        error = self.assertRaises(ValueError, check_output, output)
        self.assertIn("not writable", str(error))

    def _deny_write(self, denied: str) -> None:
        real_access = os.access

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            if os.path.abspath(path) == denied and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        # storage looks os.access up at call time; trial restores it afterwards.
        self.patch(storage.os, "access", access)


class PlaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.source = os.path.join(self.directory, "work.server")
        with open(self.source, "wb") as f:
            f.write(b"finished bytes")
        self.output = os.path.join(self.directory, "out.bin")

    def leftovers(self) -> list[str]:
        return sorted(name for name in os.listdir(self.directory) if name.endswith(".tmp"))

    def refuse_links(self) -> None:
        def link(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        self.patch(storage.os, "link", link)

    def test_link_shares_the_inode(self) -> None:
        """On the same filesystem the output is a hard link to the working file."""
        place(self.source, self.output, "s")
        self.assertEqual(os.stat(self.output).st_ino, os.stat(self.source).st_ino)

    def test_link_leaves_no_temporary_file(self) -> None:
        """The temporary name is renamed away."""
        place(self.source, self.output, "s")
        self.assertEqual(self.leftovers(), [])

    def test_existing_output_is_replaced(self) -> None:
        """An older file at the output is replaced, not appended to."""
        with open(self.output, "wb") as f:
            f.write(b"old and longer contents")
        place(self.source, self.output, "s")
        with open(self.output, "rb") as f:
            self.assertEqual(f.read(), b"finished bytes")

    def test_stale_temporary_file_is_replaced(self) -> None:
        """A temporary file left by a crashed run does not block the link."""
        with open(os.path.join(self.directory, ".out.bin.s.tmp"), "wb") as f:
            f.write(b"stale")
        place(self.source, self.output, "s")
        self.assertEqual(
            (os.stat(self.output).st_ino, self.leftovers()),
            (os.stat(self.source).st_ino, []),
        )

    def test_copy_when_link_fails(self) -> None:
        """Across filesystems (EXDEV) the bytes are copied instead."""
        self.refuse_links()
        place(self.source, self.output, "s")
        with open(self.output, "rb") as f:
            self.assertEqual(f.read(), b"finished bytes")

    def test_copy_is_a_separate_file(self) -> None:
        """The copied output is its own inode."""
        self.refuse_links()
        place(self.source, self.output, "s")
        self.assertNotEqual(os.stat(self.output).st_ino, os.stat(self.source).st_ino)

    def test_copy_leaves_no_temporary_file(self) -> None:
        """The copy path also renames its temporary name away."""
        self.refuse_links()
        place(self.source, self.output, "s")
        self.assertEqual(self.leftovers(), [])

    def test_copy_does_not_follow_a_symlink_planted_at_the_temporary_name(self) -> None:
        """A symlink put at the temporary name after the stale one is removed cannot redirect the copy."""
        victim = os.path.join(self.directory, "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")

        def link(*args: Any, **kwargs: Any) -> None:
            # The race: between place()'s unlink of a stale temporary file
            # and its open, someone who can write the directory plants a link.
            os.symlink(victim, os.path.join(self.directory, ".out.bin.s.tmp"))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        self.patch(storage.os, "link", link)
        self.assertRaises(FileExistsError, place, self.source, self.output, "s")
        with open(victim, "rb") as f:
            self.assertEqual((f.read(), os.path.exists(self.output)), (b"precious", False))

    def test_copy_has_the_working_files_mode(self) -> None:
        """The copy gets the working file's permissions, as the hard link shares them."""
        os.chmod(self.source, 0o640)
        self.refuse_links()
        place(self.source, self.output, "s")
        self.assertEqual(os.stat(self.output).st_mode & 0o777, 0o640)

    def test_unexpected_error_leaves_output_untouched(self) -> None:
        """A missing working file raises, and the old output and no temp remain."""
        with open(self.output, "wb") as f:
            f.write(b"old")
        os.unlink(self.source)
        self.assertRaises(FileNotFoundError, place, self.source, self.output, "s")
        with open(self.output, "rb") as f:
            self.assertEqual((f.read(), self.leftovers()), (b"old", []))


class FileDigestTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_sha256(self) -> None:
        """sha256 of a file matches hashlib's."""
        data = b"dfly" * 1000
        self.assertEqual(file_digest(self.write(data), "sha256"), hashlib.sha256(data).hexdigest())

    def test_md5(self) -> None:
        """md5 of a file matches hashlib's."""
        data = b"dfly" * 1000
        self.assertEqual(file_digest(self.write(data), "md5"), hashlib.md5(data).hexdigest())

    def test_empty_file(self) -> None:
        """The digest of an empty file is the digest of no bytes."""
        self.assertEqual(file_digest(self.write(b""), "md5"), "d41d8cd98f00b204e9800998ecf8427e")

    def test_file_larger_than_one_read(self) -> None:
        """Files longer than the 1 MiB read size are hashed whole."""
        data = bytes(range(256)) * 5000  # 1.2 MiB
        self.assertEqual(file_digest(self.write(data), "sha256"), hashlib.sha256(data).hexdigest())
