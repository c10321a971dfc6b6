"""What ends when on the supernode, through its API (StubTreq, a `Clock`, a fake origin).

Task expiry, silent peers, the access and 404 memories, revalidation and task
versions, the limits, resuming a fetch cut off by a restart, and a cache
file removed by hand.  The harness is `tests.test_supernode_api`'s; its
origin gains what these need (`ValidatingOrigin`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

from dfly import codes
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.config import SupernodeFileConfig
from dfly.supernode.diskgc import DiskQuota
from dfly.supernode.tap import _Supernode
from dfly.supernode.policy import SchedulerPolicy
from dfly.pieces import task_id
from dfly.supernode.tasks import Limits, version_id
from tests.test_supernode_api import (
    FIVE,
    ORIGIN,
    SMALL,
    TWO,
    Origin,
    P,
    SupernodeApiTestCase,
    payload,
    registration,
    sha256,
)

THREE = 2 * P + 100  # three pieces, the last short
TOKEN = "Bearer t0ken-one"
NEW_TOKEN = "Bearer t0ken-two"


class ValidatingOrigin(Origin):
    """`Origin` plus: open-ended ``Range`` with ``If-Range``, ETags on streamed paths, and a log of statuses.

    ``answers[i]`` is the status of ``requests[i]`` (a streamed or held
    request counts as what its headers said when the handler returned).
    """

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[int] = []

    def render_GET(self, request: Request) -> Any:
        body = self._render(request)
        self.answers.append(request.code)
        return body

    def _render(self, request: Request) -> Any:
        path = request.path
        self.requests.append((path, request.requestHeaders.copy()))
        if path in self.silent:
            self.held.append(request)
            return NOT_DONE_YET
        secret = self.secrets.get(path)
        if secret is not None and request.getHeader(b"authorization") != secret:
            request.setResponseCode(401)
            return b"who are you?\n"
        etag = self.etags.get(path)
        if etag is not None:
            request.setHeader(b"etag", etag)
        if path in self.streams:
            length = self.streams[path]
            if length is not None:
                request.setHeader(b"content-length", b"%d" % length)
            request.write(b"")
            self.held.append(request)
            return NOT_DONE_YET
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"no such file\n"
        if etag is not None and request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        wanted = request.getHeader(b"range")
        if_range = request.getHeader(b"if-range")
        if wanted is not None and (if_range is None or if_range == etag):
            match = re.fullmatch(rb"bytes=(\d+)-(\d*)", wanted)
            assert match is not None, wanted
            start = int(match.group(1))
            end = min(int(match.group(2)), len(body) - 1) if match.group(2) else len(body) - 1
            if start >= len(body):
                request.setResponseCode(416)
                request.setHeader(b"content-range", b"bytes */%d" % len(body))
                return b""
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, len(body)))
            return body[start : end + 1]
        return body

    def last(self, path: bytes) -> tuple[int, Any]:
        """(status, headers) of the newest request for ``path``."""
        i = max(n for n, (p, _) in enumerate(self.requests) if p == path)
        return self.answers[i], self.requests[i][1]


class LifecycleTestCase(SupernodeApiTestCase):
    """The API harness over a `ValidatingOrigin`; ``options`` go to the TaskManager."""

    origin_class = ValidatingOrigin

    def start_cut_fetch(self) -> None:
        """/three (ETag "e1") streamed: its first piece and a bit of the second have arrived, the rest has not."""
        self.data = payload(THREE)
        self.origin.etags[b"/three"] = b'"e1"'
        self.origin.streams[b"/three"] = THREE
        self.tid = self.register_ok(f"{ORIGIN}/three")
        self.origin.held[0].write(self.data[: P + 50])
        self.pump()

    def serve_tagged(self, name: bytes, length: int, etag: bytes = b'"v1"', seed: int = 0) -> str:
        self.origin.files[name] = payload(length, seed)
        self.origin.etags[name] = etag
        return ORIGIN + name.decode()

    def download(self, tid: str, cid: str = "peer-1") -> list[str]:
        """``cid`` pulls and reports every piece until 600; the digests it was given, by piece."""
        got: dict[int, str] = {}
        for _ in range(10):
            answer = self.pull(tid, cid)
            if answer.code == 600:
                return [got[n] for n in sorted(got)]
            self.assertEqual((answer.status, answer.code), (200, 601), answer)
            for piece in answer.data:
                got[piece["pieceNum"]] = piece["pieceDigest"]
                self.report(tid, piece["range"], cid=cid)
        raise AssertionError(f"{cid} did not finish {tid}")

    def service_down(self, tid: str, cid: str = "peer-1") -> None:
        answer = self.call("GET", "/peer/service/down", params={"taskId": tid, "cid": cid})
        self.assertEqual(answer.code, 612, answer)

    def digests(self, data: bytes) -> list[str]:
        return [sha256(data[n : n + P]) for n in range(0, len(data), P)]


# --- task expiry ---------------------------------------------------------------------------


class TaskExpiryTests(LifecycleTestCase):
    options = {"task_expire_time": 40.0}

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve_tagged(b"/file", TWO)
        self.tid = self.register_ok(self.url)
        self.download(self.tid)
        self.service_down(self.tid)

    def test_task_without_peers_stays_until_task_expire_time(self) -> None:
        """At exactly task_expire_time after its last peer left, the task is still in memory."""
        self.clock.advance(40.0)
        self.tasks.sweep()
        self.assertIn(self.tid, self.tasks.tasks)

    def test_task_without_peers_leaves_memory_after_task_expire_time(self) -> None:
        """Just over task_expire_time after its last peer left, the task is gone (a pull is 404)."""
        self.clock.advance(40.1)
        self.tasks.sweep()
        self.assertEqual((self.tid in self.tasks.tasks, self.tasks.key_for(self.tid)), (False, None))

    def test_expired_task_leaves_its_cache_on_disk(self) -> None:
        """Leaving memory does not remove the cached bytes or their meta."""
        self.clock.advance(40.1)
        self.tasks.sweep()
        with open(self.cache.data_path(self.tid), "rb") as f:
            self.assertEqual(f.read(), payload(TWO))
        self.assertIsNotNone(self.cache.load_meta(self.tid))

    def test_new_peer_before_expiry_keeps_the_task(self) -> None:
        """A registration before task_expire_time stops the clock: the task stays while it has a peer."""
        self.clock.advance(30.0)
        self.register_ok(self.url, cid="peer-2")
        self.clock.advance(20.0)
        self.tasks.sweep()
        self.assertIn(self.tid, self.tasks.tasks)

    def test_registration_after_expiry_revalidates_the_cache(self) -> None:
        """The task comes back from its cache: one conditional GET answered 304, no second full GET."""
        self.clock.advance(40.1)
        self.tasks.sweep()
        again = self.register_ok(self.url, cid="peer-2")
        status, headers = self.origin.last(b"/file")
        self.assertEqual(
            (again, self.origin.answers, headers.getRawHeaders(b"if-none-match")), (self.tid, [200, 304], [b'"v1"'])
        )

    def test_task_back_from_its_cache_serves_the_cached_digests(self) -> None:
        """After the 304 the pieces are offered with the digests of the bytes on disk."""
        self.clock.advance(40.1)
        self.tasks.sweep()
        self.register_ok(self.url, cid="peer-2")
        self.assertEqual(self.download(self.tid, "peer-2"), self.digests(payload(TWO)))

    def test_task_back_from_its_cache_has_a_new_key(self) -> None:
        """A reloaded task gets a fresh key (issue 11 item 5): a key handed out before it left memory reads nothing."""
        old_key = self.tasks.key_for(self.tid)
        self.clock.advance(40.1)
        self.tasks.sweep()
        self.register_ok(self.url, cid="peer-2")
        new_key = self.tasks.key_for(self.tid)
        self.assertEqual((new_key is not None, new_key != old_key), (True, True))
        self.assertEqual((self.cdn_status(self.tid, old_key), self.cdn_status(self.tid, new_key)), (404, 206))

    def cdn_status(self, tid: str, key: str | None) -> int:
        """The CDN port's status for the first piece of ``tid`` asked with ``key``."""
        request = DummyRequest([b"download", tid[:3].encode(), tid.encode()])
        request.requestHeaders.setRawHeaders(codes.TASK_KEY_HEADER, [key or ""])
        request.requestHeaders.setRawHeaders(b"range", [b"bytes=0-99"])
        getChildForRequest(CdnFiles(self.cache, keys=self.tasks.key_for), request).render(request)
        return request.responseCode or 200


# --- silent peers --------------------------------------------------------------------------


class SilenceTests(LifecycleTestCase):
    options = {"policy": SchedulerPolicy(silence=2.0, finished_silence=20.0)}

    def finished(self) -> str:
        """peer-1 fetched /small and got 600; returns the task id."""
        url = self.serve_tagged(b"/small", SMALL)
        self.url = url
        tid = self.register_ok(url)
        self.download(tid)
        return tid

    def test_finished_peer_outlives_the_downloading_silence(self) -> None:
        """A finished peer silent for longer than policy.silence (but not finished_silence) stays a source."""
        tid = self.finished()
        self.clock.advance(10.0)
        self.tasks.sweep()
        self.assertIn("peer-1", self.tasks.task(tid).peers)

    def test_finished_peer_silent_for_exactly_finished_silence_is_kept(self) -> None:
        """At exactly policy.finished_silence the finished peer is still there."""
        tid = self.finished()
        self.clock.advance(20.0)
        self.tasks.sweep()
        self.assertIn("peer-1", self.tasks.task(tid).peers)

    def test_finished_peer_silent_past_the_policys_finished_silence_is_dropped(self) -> None:
        """policy.finished_silence (here 20 s) is what a finished peer's silence is measured by."""
        tid = self.finished()
        self.clock.advance(20.1)
        self.tasks.sweep()
        self.assertNotIn("peer-1", self.tasks.task(tid).peers)

    def test_downloading_peer_silent_past_the_policys_silence_is_dropped(self) -> None:
        """policy.silence (here 2 s, not the default 6) drops a peer that went quiet mid-download."""
        tid = self.register_ok(self.serve_tagged(b"/five", FIVE))
        self.pull(tid)
        self.clock.advance(2.1)
        self.tasks.sweep()
        self.assertNotIn("peer-1", self.tasks.task(tid).peers)

    def test_task_whose_last_peer_was_dropped_expires(self) -> None:
        """A task whose only peer went silent leaves memory task_expire_time after the drop."""
        tid = self.finished()
        self.clock.advance(20.1)
        self.tasks.sweep()
        self.clock.advance(self.tasks.task_expire_time + 0.1)
        self.tasks.sweep()
        self.assertNotIn(tid, self.tasks.tasks)


# --- the access and 404 memories ---------------------------------------------------------------


class MissingMemoryTests(LifecycleTestCase):
    options = {"fail_access_interval": 10.0}

    def test_404_is_answered_from_memory_within_fail_access_interval(self) -> None:
        """Within fail_access_interval (here 10 s) a missing source is not asked again."""
        self.register(f"{ORIGIN}/missing")
        self.clock.advance(10.0)
        answer = self.register(f"{ORIGIN}/missing")
        self.assertEqual((answer.status, answer.code, self.origin.count(b"/missing")), (404, 607, 1))

    def test_404_memory_leaves_memory_after_fail_access_interval(self) -> None:
        """A sweep after fail_access_interval reclaims the memory of a missing source."""
        self.register(f"{ORIGIN}/missing")
        remembered = self.tasks.access.sizes[1]
        self.clock.advance(10.1)
        self.tasks.sweep()
        self.assertEqual((remembered, self.tasks.access.sizes[1]), (1, 0))

    def test_source_is_asked_again_after_fail_access_interval(self) -> None:
        """After the interval the origin is asked, and a file now there registers."""
        self.register(f"{ORIGIN}/missing")
        self.clock.advance(10.1)
        self.serve(b"/missing", SMALL)
        self.assertEqual((self.register(f"{ORIGIN}/missing").status, self.origin.count(b"/missing")), (200, 2))


class AccessExpiryTests(LifecycleTestCase):
    """A private file without validators (so no revalidation), guarded by a token; access_ttl 60 s."""

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = TOKEN.encode()
        self.tid = self.register_ok(self.url, headers={"Authorization": TOKEN})

    def test_same_headers_within_access_ttl_are_not_probed(self) -> None:
        """At exactly access_ttl the caller's earlier answer still stands: no request to the origin."""
        self.clock.advance(60.0)
        self.register_ok(self.url, cid="peer-2", headers={"Authorization": TOKEN})
        self.assertEqual(self.origin.count(b"/private"), 1)

    def test_same_headers_after_access_ttl_are_probed_again(self) -> None:
        """After access_ttl the same credentials are checked again with a 1-byte GET carrying them."""
        self.clock.advance(60.1)
        self.register_ok(self.url, cid="peer-2", headers={"Authorization": TOKEN})
        status, headers = self.origin.last(b"/private")
        self.assertEqual(
            (self.origin.count(b"/private"), headers.getRawHeaders(b"range"), headers.getRawHeaders(b"authorization")),
            (2, [b"bytes=0-0"], [TOKEN.encode()]),
        )

    def test_revoked_token_still_reads_within_access_ttl(self) -> None:
        """Revocation takes effect within access_ttl, not at once: the remembered answer is used."""
        self.origin.secrets[b"/private"] = NEW_TOKEN.encode()
        self.clock.advance(30.0)
        self.register_ok(self.url, cid="peer-2", headers={"Authorization": TOKEN})

    def test_revoked_token_is_refused_after_access_ttl_though_cached(self) -> None:
        """After access_ttl a token the origin now answers 401 to gets 403/608, though the bytes are cached."""
        self.origin.secrets[b"/private"] = NEW_TOKEN.encode()
        self.clock.advance(60.1)
        answer = self.register(self.url, cid="peer-2", headers={"Authorization": TOKEN})
        self.assertEqual((answer.status, answer.code, self.origin.answers[-1]), (403, 608, 401))

    def test_refused_caller_does_not_join_the_task(self) -> None:
        """The refused caller is not a peer of the task."""
        self.origin.secrets[b"/private"] = NEW_TOKEN.encode()
        self.clock.advance(60.1)
        self.register(self.url, cid="peer-2", headers={"Authorization": TOKEN})
        self.assertNotIn("peer-2", self.tasks.task(self.tid).peers)


# --- revalidation and versions ------------------------------------------------------------------


class RevalidationTests(LifecycleTestCase):
    """/file with ETag "v1", fetched by peer-1 at t=0; revalidate_window 5 s."""

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve_tagged(b"/file", TWO)
        self.tid = self.register_ok(self.url)

    def test_registration_after_the_window_sends_if_none_match(self) -> None:
        """A registration for a finished task after revalidate_window asks the origin with its ETag."""
        self.clock.advance(5.1)
        self.register_ok(self.url, cid="peer-2")
        status, headers = self.origin.last(b"/file")
        self.assertEqual((headers.getRawHeaders(b"if-none-match"), status), ([b'"v1"'], 304))

    def test_registration_within_the_window_does_not_revalidate(self) -> None:
        """Within revalidate_window of the last answer, nothing is asked."""
        self.clock.advance(5.0)
        self.register_ok(self.url, cid="peer-2")
        self.assertEqual(self.origin.count(b"/file"), 1)

    def test_answer_is_shared_for_the_window_after_a_revalidation(self) -> None:
        """Registrations right after a revalidation use its answer."""
        self.clock.advance(5.1)
        self.register_ok(self.url, cid="peer-2")
        self.clock.advance(4.0)
        self.register_ok(self.url, cid="peer-3")
        self.assertEqual(self.origin.count(b"/file"), 2)

    def test_burst_of_registrations_shares_one_conditional_request(self) -> None:
        """Three registrations arriving while the revalidation is in flight wait for it: one request."""
        self.clock.advance(5.1)
        self.origin.silent.add(b"/file")
        burst = [self.start("POST", "/peer/registry", json=self.body(cid)) for cid in ("peer-2", "peer-3", "peer-4")]
        self.pump()
        for d in burst:
            self.assertNoResult(d)
        held = self.origin.held[0]
        held.setResponseCode(304)
        held.setHeader(b"etag", b'"v1"')
        held.finish()
        self.pump()
        answers = [self.successResultOf(d) for d in burst]
        self.assertEqual(([a.data["taskId"] for a in answers], self.origin.count(b"/file")), ([self.tid] * 3, 2))

    def body(self, cid: str) -> dict[str, Any]:
        return registration(self.url, cid)


class VersionTests(LifecycleTestCase):
    """peer-1 is part way through /five (ETag "v1") when the origin replaces it (ETag "v2")."""

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve_tagged(b"/five", FIVE)
        self.old = self.register_ok(self.url)
        self.first = self.pull(self.old).data  # pieces 0-3 from the CDN
        self.serve_tagged(b"/five", FIVE, etag=b'"v2"', seed=1)
        self.clock.advance(5.1)
        self.new = self.register_ok(self.url, cid="peer-2", ip="192.0.2.2", port=15002)

    def test_replaced_source_makes_a_new_task_id(self) -> None:
        """The second registration gets the id of the new version, not the old task's."""
        self.assertEqual(
            (self.new != self.old, self.new), (True, version_id(self.old, '"v2"'))
        )

    def test_replaced_source_is_found_by_a_conditional_request_answered_200(self) -> None:
        """The origin saw If-None-Match: "v1" and answered 200 with the new bytes."""
        status, headers = self.origin.last(b"/five")
        self.assertEqual((self.origin.count(b"/five"), headers.getRawHeaders(b"if-none-match"), status),
                         (2, [b'"v1"'], 200))

    def test_new_version_has_its_own_key(self) -> None:
        """The new version's key differs from the old one's: each key reads one version's bytes only."""
        old_key, new_key = self.tasks.key_for(self.old), self.tasks.key_for(self.new)
        self.assertEqual((old_key is not None, new_key is not None, old_key != new_key), (True, True, True))

    def test_new_version_pieces_carry_the_new_digests(self) -> None:
        """Pulling the new task yields the digests of the new bytes."""
        self.assertEqual(self.download(self.new, "peer-2"), self.digests(payload(FIVE, seed=1)))

    def test_new_version_has_its_own_cache_file(self) -> None:
        """The new bytes are cached under the new id; the old file keeps the old bytes."""
        with open(self.cache.data_path(self.new), "rb") as f:
            new = f.read()
        with open(self.cache.data_path(self.old), "rb") as f:
            old = f.read()
        self.assertEqual((new == payload(FIVE, seed=1), old == payload(FIVE)), (True, True))

    def test_peer_of_the_old_version_keeps_getting_the_old_digests(self) -> None:
        """peer-1, still registered on the old id, is given the old bytes' last piece: no mixing."""
        self.report(self.old, self.first[0]["range"])
        answer = self.pull(self.old)
        self.assertEqual(
            [(p["pieceNum"], p["pieceDigest"]) for p in answer.data], [(4, self.digests(payload(FIVE))[4])]
        )

    def test_new_registrant_is_not_on_the_old_task(self) -> None:
        """peer-2 registered on the new version only."""
        self.assertEqual(
            ("peer-2" in self.tasks.task(self.old).peers, "peer-2" in self.tasks.task(self.new).peers), (False, True)
        )


# --- limits --------------------------------------------------------------------------------------


class TaskLimitTests(LifecycleTestCase):
    options = {"limits": Limits(max_tasks=2, max_peers_per_task=2)}

    def test_registration_of_a_new_url_over_max_tasks_is_503_json(self) -> None:
        """With max_tasks tasks in memory, a third URL is refused with 503 and a JSON reason."""
        self.register_ok(self.serve(b"/a", SMALL))
        self.register_ok(self.serve(b"/b", SMALL))
        answer = self.register(self.serve(b"/c", SMALL))
        self.assertEqual(answer.status, 503)
        self.assertIn("--max-tasks", answer.json()["msg"])

    def test_existing_tasks_keep_working_at_max_tasks(self) -> None:
        """Refusing a new task does not disturb the tasks held: they still register and pull."""
        tid = self.register_ok(self.serve(b"/a", SMALL))
        self.register_ok(self.serve(b"/b", SMALL))
        self.register(self.serve(b"/c", SMALL))
        self.register_ok(f"{ORIGIN}/a", cid="peer-2")
        self.assertEqual(self.pieces(self.pull(tid, "peer-2")), [0])

    def test_peer_over_max_peers_per_task_is_503_json(self) -> None:
        """A third peer of a task limited to two is refused with 503 and a JSON reason."""
        url = self.serve(b"/a", SMALL)
        self.register_ok(url)
        self.register_ok(url, cid="peer-2")
        answer = self.register(url, cid="peer-3")
        self.assertEqual(answer.status, 503)
        self.assertIn("--max-peers-per-task", answer.json()["msg"])

    def test_registered_peer_may_register_again_at_max_peers(self) -> None:
        """A peer already in the task is not a new peer."""
        url = self.serve(b"/a", SMALL)
        self.register_ok(url)
        self.register_ok(url, cid="peer-2")
        self.register_ok(url, cid="peer-2")


class FileSizeLimitTests(LifecycleTestCase):
    options = {"limits": Limits(max_file_size=1000)}

    def test_content_length_over_max_file_size_is_413_json(self) -> None:
        """A source announcing 1001 bytes over a 1000-byte limit is refused with 413 and a JSON reason."""
        answer = self.register(self.serve(b"/big", 1001))
        self.assertEqual(answer.status, 413)
        self.assertIn("--max-file-size", answer.json()["msg"])

    def test_file_of_exactly_max_file_size_is_fetched(self) -> None:
        """The limit itself is allowed."""
        tid = self.register_ok(self.serve(b"/big", 1000))
        self.assertEqual(self.download(tid), [sha256(payload(1000))])

    def endless(self) -> str:
        """Register a chunked source that sends 600 bytes at a time until cut off; returns the task id."""
        self.origin.streams[b"/endless"] = None
        tid = self.register_ok(f"{ORIGIN}/endless")
        body = self.origin.held[0]
        for _ in range(10):
            if not self.tasks.task(tid).fetch.running:
                break
            body.write(b"x" * 600)
            self.pump()
        return tid

    def test_endless_chunked_source_fails_the_task_at_the_limit(self) -> None:
        """A body of unknown length is cut off past max_file_size: the task fails (pulls are 502/610)."""
        tid = self.endless()
        answer = self.pull(tid)
        self.assertEqual((answer.status, answer.code), (502, 610))
        self.assertIn("limit", answer.json()["msg"])

    def test_endless_chunked_source_leaves_nothing_cached(self) -> None:
        """Neither data nor meta of the cut-off fetch stays on disk."""
        tid = self.endless()
        self.assertEqual(
            (os.path.exists(self.cache.data_path(tid)), os.path.exists(self.cache.meta_path(tid))), (False, False)
        )


# --- resume after a restart ------------------------------------------------------------------------


class StopWritesTheLastMetaTests(LifecycleTestCase):
    """A stop waits for the last .meta of each cancelled fetch, and the disk pool stops only after it."""

    def setUp(self) -> None:
        self.disk = StepDisk()
        self.options = {"disk": self.disk}
        super().setUp()
        self.start_cut_fetch()

    def run_disk(self) -> None:
        while self.disk.jobs:
            self.disk.step()
            self.pump()

    def test_stop_fires_only_after_the_last_meta_is_written(self) -> None:
        stopped = self.tasks.stop()
        self.pump()
        self.assertTrue(self.disk.jobs)  # the last meta is queued on the disk pool
        self.assertNoResult(stopped)
        self.run_disk()
        self.successResultOf(stopped)
        with open(self.cache.meta_path(self.tid), encoding="utf-8") as f:
            meta = json.load(f)
        self.assertEqual((meta["state"], meta["pieceDigests"]), ("fetching", [sha256(self.data[:P])]))

    def test_supernode_service_stops_its_disk_pool_after_the_fetches(self) -> None:
        disk_pool = RecordingService()
        service = _Supernode(self.tasks, HTTPConnectionPool(self.clock, persistent=False), self.clock,
                             SupernodeFileConfig(), disk_pool)
        service.startService()
        self.assertTrue(disk_pool.running)
        done = service.stopService()
        self.pump()
        self.assertTrue(disk_pool.running)  # the last meta is not written yet
        self.run_disk()
        self.successResultOf(done)
        self.assertFalse(disk_pool.running)


class RecordingService(Service):
    """Stands in for the disk pool: only whether it runs matters here."""


class StopAnswersHeldPullsTests(LifecycleTestCase):
    """A stop lets every held pull go with 602 and leaves no timer on the reactor."""

    def setUp(self) -> None:
        super().setUp()
        self.origin.streams[b"/live"] = TWO  # headers only: no piece is ready, every pull is held
        self.tid = self.register_ok(f"{ORIGIN}/live")
        self.register_ok(f"{ORIGIN}/live", cid="peer-2", ip="192.0.2.2", port=15002)

    def test_stop_answers_every_held_pull_with_602(self) -> None:
        """Held pulls (a cancelled fetch wakes them to look again) answer 602 at once, and no timer is left."""
        held = [self.start_pull(self.tid, cid) for cid in ("peer-1", "peer-2")]
        self.pump()
        for d in held:
            self.assertNoResult(d)
        self.tasks.stop()
        self.pump()
        self.assertEqual(
            ([(a.status, a.code) for a in map(self.successResultOf, held)],
             self.tasks.held_pulls(), len(self.tasks.deadlines), self.clock.getDelayedCalls()),
            ([(200, 602), (200, 602)], 0, 0, []),
        )

    def test_pull_after_stop_is_answered_602_at_once(self) -> None:
        """A pull reaching a stopped supernode is not held: no deadline would ever answer it."""
        self.tasks.stop()
        self.pump()
        answer = self.pull(self.tid)
        self.assertEqual(((answer.status, answer.code), self.tasks.held_pulls(), self.clock.getDelayedCalls()),
                         ((200, 602), 0, []))


class ResumeTests(LifecycleTestCase):
    """/three (ETag "e1") is cut off by a restart after its first piece and a bit of the second."""

    def setUp(self) -> None:
        super().setUp()
        self.start_cut_fetch()
        self.tasks.stop()
        self.pump()
        del self.origin.streams[b"/three"]
        self.origin.files[b"/three"] = self.data
        self.start_supernode()  # the restart, over the same --home

    def meta(self) -> dict[str, Any]:
        with open(self.cache.meta_path(self.tid), encoding="utf-8") as f:
            return json.load(f)

    def test_interrupted_fetch_leaves_a_fetching_meta_with_its_verified_pieces(self) -> None:
        """The meta says "fetching" and holds the digest of the one whole piece."""
        meta = self.meta()
        self.assertEqual((meta["state"], meta["pieceDigests"], meta["etag"]),
                         ("fetching", [sha256(self.data[:P])], '"e1"'))

    def test_restarted_supernode_resumes_with_range_and_if_range(self) -> None:
        """The new registration asks for the bytes after the verified piece, if the source is unchanged."""
        self.register_ok(f"{ORIGIN}/three")
        status, headers = self.origin.last(b"/three")
        self.assertEqual(
            (headers.getRawHeaders(b"range"), headers.getRawHeaders(b"if-range"), status),
            ([f"bytes={P}-".encode()], [b'"e1"'], 206),
        )

    def test_resumed_fetch_caches_the_file_byte_exact(self) -> None:
        """The resumed cache file is the source's bytes exactly, and the meta is done."""
        self.register_ok(f"{ORIGIN}/three")
        with open(self.cache.data_path(self.tid), "rb") as f:
            cached = f.read()
        self.assertEqual((cached == self.data, len(cached), self.meta()["state"]), (True, THREE, "done"))

    def test_resumed_task_serves_every_piece_with_its_digest(self) -> None:
        """The verified prefix and the fetched rest are offered with the right digests."""
        tid = self.register_ok(f"{ORIGIN}/three")
        self.assertEqual(self.download(tid), self.digests(self.data))

    def test_changed_source_is_fetched_whole(self) -> None:
        """When If-Range fails (new ETag) the origin answers 200 and the cache holds the new bytes."""
        self.origin.files[b"/three"] = payload(THREE, seed=1)
        self.origin.etags[b"/three"] = b'"e2"'
        self.register_ok(f"{ORIGIN}/three")
        with open(self.cache.data_path(self.tid), "rb") as f:
            cached = f.read()
        self.assertEqual((self.origin.answers[-1], cached == payload(THREE, seed=1)), (200, True))

    def test_changed_source_makes_one_request(self) -> None:
        """The 200 to the resume is used as the whole fetch: no second GET."""
        self.origin.files[b"/three"] = payload(THREE, seed=1)
        self.origin.etags[b"/three"] = b'"e2"'
        self.register_ok(f"{ORIGIN}/three")
        self.assertEqual(self.origin.count(b"/three"), 2)


# --- a cache file removed by hand ---------------------------------------------------------------------


class MissingCacheFileTests(LifecycleTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve(b"/file", TWO)
        self.tid = self.register_ok(self.url)
        self.key = self.tasks.key_for(self.tid)
        os.unlink(self.cache.data_path(self.tid))

    def cdn_get(self) -> int:
        """GET the task's file on the CDN resource, wired as tap.py wires it; the status."""
        request = DummyRequest([b"download", self.tid[:3].encode(), self.tid.encode()])
        request.requestHeaders.setRawHeaders(codes.TASK_KEY_HEADER, [self.key])
        cdn = CdnFiles(self.cache, keys=self.tasks.key_for, on_missing=self.tasks.cache_file_missing)
        getChildForRequest(cdn, request).render(request)
        return request.responseCode

    def test_cdn_get_of_a_deleted_file_is_404(self) -> None:
        """The CDN says 404 for a known task whose file is gone."""
        self.assertEqual(self.cdn_get(), 404)

    def test_deleted_file_fails_the_task(self) -> None:
        """After the CDN found the file gone, pulls are 502/610."""
        self.cdn_get()
        answer = self.pull(self.tid)
        self.assertEqual((answer.status, answer.code), (502, 610))

    def test_next_registration_fetches_the_file_again(self) -> None:
        """The next registration GETs the source again, unconditionally, and the file is back."""
        self.cdn_get()
        self.register_ok(self.url, cid="peer-2")
        status, headers = self.origin.last(b"/file")
        with open(self.cache.data_path(self.tid), "rb") as f:
            cached = f.read()
        self.assertEqual(
            (self.origin.count(b"/file"), status, headers.getRawHeaders(b"if-none-match"), cached == payload(TWO)),
            (2, 200, None, True),
        )

    def test_refetched_task_serves_its_pieces(self) -> None:
        """After the refetch a new peer downloads the whole file."""
        self.cdn_get()
        tid = self.register_ok(self.url, cid="peer-2")
        self.assertEqual(self.download(tid, "peer-2"), self.digests(payload(TWO)))


class StepDisk:
    """A disk pool that runs its jobs one at a time, when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, job: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def step(self) -> None:
        job, d = self.jobs.pop(0)
        d.callback(job())


class ReviewRegressionTests(LifecycleTestCase):
    """Bugs an independent review found in the first version of this code."""

    options = {"task_expire_time": 10.0}

    def test_old_version_survives_when_the_newer_one_expires(self) -> None:
        """A newer version leaving memory hands registrations back to the older one; its peers keep pulling it."""
        url = self.serve_tagged(b"/five", FIVE)
        old = self.register_ok(url)
        first = self.pull(old).data
        self.serve_tagged(b"/five", FIVE, etag=b'"v2"', seed=1)
        self.clock.advance(5.1)
        new = self.register_ok(url, cid="peer-2", ip="192.0.2.2", port=15002)
        self.download(new, "peer-2")
        self.service_down(new, "peer-2")
        for i in range(4):  # peer-1 stays alive past the new version's expiry
            self.clock.advance(4)
            self.report(old, first[i]["range"])
            self.tasks.sweep()
        old_key = self.tasks.key_for(old)
        third = self.register_ok(url, cid="peer-3", ip="192.0.2.3", port=15003)
        self.assertNotEqual(third, old)  # revalidated to the new version, not reopened under the old id
        self.assertEqual((self.tasks.key_for(old), self.pull(old).code), (old_key, 601))
        with open(self.cache.data_path(old), "rb") as f:
            self.assertEqual(f.read(), payload(FIVE))  # the old version's bytes, not the new ones

    def test_cache_that_cannot_be_written_leaves_no_stuck_task(self) -> None:
        """open_for_write failing (disk full) is a 500 for that registration and the next one fetches anew."""
        url = self.serve(b"/three", THREE)
        real = CdnCache.open_for_write

        def full(cache: CdnCache, task_id: str) -> int:
            raise OSError(28, "No space left on device")

        CdnCache.open_for_write = full  # type: ignore[method-assign]
        try:
            refused = self.register(url)
        finally:
            CdnCache.open_for_write = real  # type: ignore[method-assign]
        self.assertEqual((refused.status, refused.json()["code"], list(self.tasks.tasks)), (500, 500, []))
        tid = self.register_ok(url, cid="peer-2")
        self.assertEqual((self.tasks.task(tid).state, self.origin.count(b"/three")), ("done", 2))

    def test_registration_during_an_eviction_waits_for_it_and_fetches_anew(self) -> None:
        """The quota chose an entry (reactor) and removes it later (disk pool): a registration in between
        must not load the doomed files, but wait and fetch the source again."""
        url = self.serve(b"/three", THREE)
        tid = self.register_ok(url)
        self.download(tid)
        self.service_down(tid)
        self.clock.advance(10.1)
        self.tasks.sweep()  # left memory: its entry may be evicted
        disk = StepDisk()
        self.tasks.quota = DiskQuota(self.cache, limit=1, disk=disk)
        self.tasks.quota.index.touch(tid, THREE)
        self.tasks.quota.collect(self.tasks.in_use)
        disk.step()  # how much to free: the entry is chosen; its removal waits on the disk pool
        d = self.start("POST", "/peer/registry", json=registration(url, cid="peer-2"))
        self.pump()
        self.assertNoResult(d)  # waits for the removal instead of reading the doomed files
        disk.step()  # the files are gone now
        self.pump()
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual((self.origin.count(b"/three"), self.download(tid, "peer-2")),
                         (2, self.digests(payload(THREE))))
        with open(self.cache.data_path(tid), "rb") as f:
            self.assertEqual(f.read(), payload(THREE))

    def test_task_being_opened_is_in_use_for_the_disk_quota(self) -> None:
        """While a registration asks the source, its cache entry counts as in use (the quota keeps it)."""
        url = self.serve(b"/slow", THREE)
        self.origin.silent.add(b"/slow")
        d = self.start("POST", "/peer/registry", json=registration(url))
        self.pump()
        tid = task_id(url)
        self.assertEqual((self.tasks.in_use(tid), tid in self.tasks.tasks), (True, False))
        self.clock.advance(31)  # the source never answers: the open gives up
        self.pump()
        self.assertEqual((self.successResultOf(d).status, self.tasks.in_use(tid)), (502, False))
