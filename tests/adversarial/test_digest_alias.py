"""Item 2 of the trust-boundary issue: a digest cannot unlock another repository's blob.

The registry decides who reads what, per repository; the supernode asks it
with the caller's own URL (the access probe).  Before the fix a digest made
the task "these bytes on this server" whatever the URL's path, so an
attacker who may read any blob registered that blob's URL with a private
layer's digest (manifests, CI logs and ``docker history`` show digests) and
was handed the private layer from the cache: the probe had asked about the
readable blob.
"""

from __future__ import annotations

import hashlib
import os

from dfly.pieces import registration_task_url
from tests.test_integration import IntegrationTestCase


class DigestAliasTests(IntegrationTestCase):
    def blob(self, repository: str, data: bytes, private: bool) -> tuple[str, str]:
        """``data`` as a blob of ``repository`` on the origin: (url, hex digest)."""
        digest = hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.join(self.origin.root, "v2", repository, "blobs"), exist_ok=True)
        served = self.serve(f"v2/{repository}/blobs/sha256:{digest}", data, auth=private)
        return served.url, digest

    async def test_a_readable_blob_s_url_with_a_private_digest_gets_no_private_bytes(self) -> None:
        secret = b"private layer: " + os.urandom(3 * 1024 * 1024)
        private_url, private_digest = self.blob("team/private", secret, private=True)
        public_url, _ = self.blob("library/public", os.urandom(100_000), private=False)
        await self.start_supernode()
        victim = self.request(private_url, headers={"Authorization": "Bearer good"},
                              digest=("sha256", private_digest))
        self.assertTrue((await self.download(victim)).success)  # the private layer is cached now
        attack = self.request(public_url, digest=("sha256", private_digest), back_source=False)
        result = await self.download(attack)
        self.assertFalse(result.success, result.line())
        self.assertIn(f"expected {private_digest}", result.error)  # the readable blob's bytes, checked and refused
        self.assertFalse(os.path.exists(attack.output))

    async def test_the_same_blob_in_two_readable_repositories_is_still_one_fetch(self) -> None:
        """What content addressing is for: a URL that names its digest shares the cache across repositories."""
        data = os.urandom(2 * 1024 * 1024 + 5)
        first, digest = self.blob("library/one", data, private=False)
        second, _ = self.blob("mirror/two", data, private=False)
        await self.start_supernode()
        for url in (first, second):
            req = self.request(url, digest=("sha256", digest))
            self.assertTrue((await self.download(req)).success)
        name = f"v2/library/one/blobs/sha256:{digest}"
        other = f"v2/mirror/two/blobs/sha256:{digest}"
        self.assertEqual(self.origin.full_gets(name) + self.origin.full_gets(other), 1)

    def test_only_a_path_that_names_the_digest_is_content_addressed(self) -> None:
        hexa, hexb = "a" * 64, "b" * 64
        self.assertEqual(registration_task_url(f"http://r:5000/v2/x/blobs/sha256:{hexa}", (), ("sha256", hexa)),
                         f"http://r:5000#sha256:{hexa}")
        for url in (f"http://r:5000/v2/x/blobs/sha256:{hexb}", "http://r:5000/file.bin",
                    f"http://r:5000/v2/x/blobs/sha256:{hexa}/extra"):
            self.assertNotIn("#", registration_task_url(url, (), ("sha256", hexa)), url)

    async def test_a_404_for_one_repository_s_url_does_not_shut_others_out_of_the_blob(self) -> None:
        """A caller's 404 (a repository without the blob) is remembered for its URL, not for the blob's task.

        Before, the probe's 404 for ``other/repo/blobs/<P>`` marked P's
        content-addressed task missing for ``fail_access_interval``: anyone
        who knew a digest sent every puller of that layer to the origin.
        """
        data = os.urandom(2 * 1024 * 1024 + 5)
        url, digest = self.blob("library/one", data, private=False)
        await self.start_supernode()
        self.assertTrue((await self.download(self.request(url, digest=("sha256", digest)))).success)
        absent = url.replace("library/one", "library/absent")
        attack = await self.download(self.request(absent, digest=("sha256", digest), back_source=False))
        self.assertFalse(attack.success, attack.line())
        again = await self.download(self.request(url, digest=("sha256", digest), back_source=False))
        self.assertTrue(again.success, again.line())
        self.assertEqual(self.origin.full_gets(f"v2/library/one/blobs/sha256:{digest}"), 1)
