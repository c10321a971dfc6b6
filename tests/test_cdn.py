"""The supernode's piece cache on disk and the CDN file resource over it.

Served files go through `DummyRequest`, which drives the (unlimited) range
producer to the end as soon as it registers.  Refusals also go through
`StubTreq` to get Site's real path parsing (percent-decoding, dot segments);
paced responses are in tests/test_limits.py.
"""

from __future__ import annotations

import json
import os

import treq
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from dfly.supernode.cdn import CacheMeta, CdnCache, CdnFiles

TID = "ab" + "c" * 62
OTHER = "ab" + "d" * 62
DATA = bytes(range(256)) * 40  # 10240 bytes


def done_meta(task_id: str = TID, length: int = len(DATA), **changes: object) -> CacheMeta:
    fields: dict[str, object] = {
        "task_id": task_id, "url": "http://origin.test/file", "length": length, "piece_size": 4096,
        "piece_digests": ("d0", "d1", "d2"), "etag": '"v1"', "last_modified": "Sun, 29 Nov 2026 04:00:00 GMT",
        "state": "done", "md5": None, "identifier": "build-7",
    }
    fields.update(changes)
    return CacheMeta(**fields)  # type: ignore[arg-type]


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = CdnCache(self.mktemp())

    def write_data(self, task_id: str = TID, data: bytes = DATA) -> None:
        fd = self.cache.open_for_write(task_id)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def write_meta_text(self, text: str, task_id: str = TID) -> None:
        os.makedirs(os.path.dirname(self.cache.meta_path(task_id)), exist_ok=True)
        with open(self.cache.meta_path(task_id), "w", encoding="utf-8") as f:
            f.write(text)


class CdnCacheTests(CacheTestCase):
    def test_data_path_is_under_repo_download_prefix(self) -> None:
        """Data lives at <home>/repo/download/<id[:3]>/<id>."""
        self.assertEqual(
            self.cache.data_path(TID), os.path.join(self.cache.home, "repo", "download", TID[:3], TID)
        )

    def test_meta_path_is_next_to_the_data(self) -> None:
        """The meta is <data path>.meta."""
        self.assertEqual(self.cache.meta_path(TID), self.cache.data_path(TID) + ".meta")

    def test_url_path_mirrors_the_layout(self) -> None:
        """Peers GET /download/<id[:3]>/<id>."""
        self.assertEqual(CdnCache.url_path(TID), f"/download/{TID[:3]}/{TID}")

    def test_open_for_write_truncates_old_data(self) -> None:
        """A new fetch starts from an empty file."""
        self.write_data()
        os.close(self.cache.open_for_write(TID))
        self.assertEqual(os.path.getsize(self.cache.data_path(TID)), 0)

    def test_meta_round_trip(self) -> None:
        """A saved done meta with its full data file loads back equal."""
        self.write_data()
        self.cache.save_meta(done_meta())
        self.assertEqual(self.cache.load_meta(TID), done_meta())

    def test_save_meta_replaces_the_old_meta(self) -> None:
        """Saving again overwrites the record."""
        self.write_data()
        self.cache.save_meta(done_meta(etag='"v1"'))
        self.cache.save_meta(done_meta(etag='"v2"'))
        meta = self.cache.load_meta(TID)
        assert meta is not None
        self.assertEqual(meta.etag, '"v2"')

    def test_save_meta_leaves_no_temporary_file(self) -> None:
        """The atomic write leaves only the data file and the meta."""
        self.write_data()
        self.cache.save_meta(done_meta())
        self.assertEqual(
            sorted(os.listdir(os.path.dirname(self.cache.data_path(TID)))), sorted([TID, TID + ".meta"])
        )

    def test_save_meta_creates_its_directory(self) -> None:
        """A meta can be saved before any data file exists."""
        self.cache.save_meta(done_meta(state="running"))
        self.assertTrue(os.path.isfile(self.cache.meta_path(TID)))

    def test_load_meta_is_none_when_missing(self) -> None:
        """No meta, no cache hit."""
        self.write_data()
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_while_running(self) -> None:
        """A meta of an unfinished fetch is no cache hit."""
        self.write_data()
        self.cache.save_meta(done_meta(state="running"))
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_after_a_failed_fetch(self) -> None:
        """A meta of a failed fetch is no cache hit."""
        self.write_data()
        self.cache.save_meta(done_meta(state="failed"))
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_without_the_data_file(self) -> None:
        """A done meta whose data file is gone is no cache hit."""
        self.cache.save_meta(done_meta())
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_when_the_size_differs(self) -> None:
        """A data file shorter than the recorded length is no cache hit."""
        self.write_data(data=DATA[:-1])
        self.cache.save_meta(done_meta())
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_corrupt_json(self) -> None:
        """A meta that is not JSON is no cache hit."""
        self.write_data()
        self.write_meta_text('{"version": 1, "taskId": ')
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_deeply_nested_json(self) -> None:
        """A meta of ``[[[[...`` (json.load raises RecursionError) is no cache hit, and no crash."""
        self.write_data()
        self.write_meta_text("[" * 100_000)
        self.assertIsNone(self.cache.load_meta(TID))
        self.assertIsNone(self.cache.load_partial(TID))

    def test_load_meta_is_none_for_non_utf8_bytes(self) -> None:
        """A meta of binary garbage is no cache hit."""
        self.write_data()
        os.makedirs(os.path.dirname(self.cache.meta_path(TID)), exist_ok=True)
        with open(self.cache.meta_path(TID), "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_a_json_list(self) -> None:
        """A meta that is JSON but not an object is no cache hit."""
        self.write_data()
        self.write_meta_text("[1, 2, 3]")
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_another_version(self) -> None:
        """A meta of an unknown format version is no cache hit."""
        self.write_data()
        record = done_meta().to_json()
        record["version"] = 99
        self.write_meta_text(json.dumps(record))
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_a_missing_field(self) -> None:
        """A meta without its length is no cache hit."""
        self.write_data()
        record = done_meta().to_json()
        del record["length"]
        self.write_meta_text(json.dumps(record))
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_a_wrong_field_type(self) -> None:
        """A meta whose digests are not a list is no cache hit."""
        self.write_data()
        record = done_meta().to_json()
        record["pieceDigests"] = None
        self.write_meta_text(json.dumps(record))
        self.assertIsNone(self.cache.load_meta(TID))

    def test_load_meta_is_none_for_another_tasks_record(self) -> None:
        """A meta naming another task id is no cache hit."""
        self.write_data()
        self.write_meta_text(json.dumps(done_meta(task_id=OTHER).to_json()))
        self.assertIsNone(self.cache.load_meta(TID))


_text = st.text(max_size=40)


class CacheMetaJsonTests(SynchronousTestCase):
    @given(
        length=st.integers(min_value=-1, max_value=2**50),
        piece_size=st.integers(min_value=1, max_value=15 << 20),
        digests=st.lists(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), max_size=5),
        etag=st.none() | _text,
        last_modified=st.none() | _text,
        state=st.sampled_from(["running", "done", "failed"]),
        md5=st.none() | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
        identifier=st.none() | _text,
        url=_text,
    )
    def test_json_round_trip(self, length, piece_size, digests, etag, last_modified, state, md5, identifier, url) -> None:  # type: ignore[no-untyped-def]
        """Any meta survives to_json, a JSON encoding and from_json unchanged."""
        meta = CacheMeta(TID, url, length, piece_size, tuple(digests), etag, last_modified, state, md5, identifier)
        self.assertEqual(CacheMeta.from_json(json.loads(json.dumps(meta.to_json()))), meta)


class CdnFilesTests(CacheTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.write_data()
        self.files = CdnFiles(self.cache)
        self.http = StubTreq(self.files)

    def render(self, path: str, byte_range: str | None = None) -> DummyRequest:
        """Traverse and render ``path`` as Site would, for a served file."""
        request = DummyRequest(path.encode().lstrip(b"/").split(b"/"))
        if byte_range is not None:
            request.requestHeaders.setRawHeaders(b"range", [byte_range.encode()])
        child = getChildForRequest(self.files, request)
        body = child.render(request)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()
        self.assertTrue(request.finished)
        return request

    def status(self, path: str) -> int:
        """The status Site answers for ``path`` (refusals only: they render at once)."""
        d = self.http.get("http://cdn.test" + path)
        self.http.flush()
        response = self.successResultOf(d)
        self.successResultOf(treq.content(response))
        return int(response.code)

    def test_range_of_a_cached_file_is_206_with_exact_bytes(self) -> None:
        """A Range GET of the data file answers 206 and exactly those bytes."""
        request = self.render(CdnCache.url_path(TID), "bytes=4096-8191")
        self.assertEqual((request.responseCode, b"".join(request.written)), (206, DATA[4096:8192]))

    def test_range_answer_names_its_content_range(self) -> None:
        """The 206 carries Content-Range with the file's length."""
        request = self.render(CdnCache.url_path(TID), "bytes=8192-10239")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-range"), [b"bytes 8192-10239/%d" % len(DATA)]
        )

    def test_range_running_past_the_end_is_cut_at_the_end(self) -> None:
        """A range whose end is past the file gives the bytes up to the end."""
        request = self.render(CdnCache.url_path(TID), "bytes=10000-99999")
        self.assertEqual((request.responseCode, b"".join(request.written)), (206, DATA[10000:]))

    def test_range_past_the_end_is_416(self) -> None:
        """A range starting past the end is not satisfiable."""
        request = self.render(CdnCache.url_path(TID), f"bytes={len(DATA)}-{len(DATA) + 10}")
        self.assertEqual(request.responseCode, 416)

    def test_whole_file_without_range_is_200(self) -> None:
        """A plain GET gets the whole file."""
        request = self.render(CdnCache.url_path(TID))
        self.assertEqual((request.responseCode, b"".join(request.written)), (200, DATA))

    def test_data_file_is_served_as_octet_stream(self) -> None:
        """Pieces are bytes, whatever the task id looks like."""
        request = self.render(CdnCache.url_path(TID), "bytes=0-0")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/octet-stream"])

    def test_meta_file_is_404(self) -> None:
        """The .meta next to the data is never served."""
        self.cache.save_meta(done_meta())
        self.assertEqual(self.status(f"/download/{TID[:3]}/{TID}.meta"), 404)

    def test_meta_temporary_file_is_404(self) -> None:
        """A leftover .meta.tmp is never served either."""
        self.write_meta_text("{}", task_id=TID)
        os.rename(self.cache.meta_path(TID), self.cache.meta_path(TID) + ".tmp")
        self.assertEqual(self.status(f"/download/{TID[:3]}/{TID}.meta.tmp"), 404)

    def test_wrong_prefix_is_404(self) -> None:
        """The directory must be the id's first three characters."""
        self.assertEqual(self.status(f"/download/abd/{TID}"), 404)

    def test_non_hex_id_is_404(self) -> None:
        """Only 64 lower-case hex digits name a task."""
        self.assertEqual(self.status(f"/download/ggg/{'g' * 64}"), 404)

    def test_upper_case_id_is_404(self) -> None:
        """Task ids are lower-case: an upper-case spelling is another name."""
        self.assertEqual(self.status(f"/download/{TID[:3].upper()}/{TID.upper()}"), 404)

    def test_short_id_is_404(self) -> None:
        """A prefix of an id is not an id."""
        self.assertEqual(self.status(f"/download/{TID[:3]}/{TID[:63]}"), 404)

    def test_dot_dot_segment_is_404(self) -> None:
        """/download/../x does not leave the download tree."""
        self.assertEqual(self.status("/download/../x"), 404)

    def test_dot_dot_in_place_of_the_prefix_is_404(self) -> None:
        """A .. where the prefix goes is refused even with a valid id after it."""
        self.assertEqual(self.status(f"/download/../{TID}"), 404)

    def test_percent_encoded_traversal_is_404(self) -> None:
        """Percent-encoded dots and slashes do not walk the disk either."""
        self.assertEqual(self.status("/download/%2e%2e/%2e%2e%2fetc%2fpasswd"), 404)

    def test_directory_of_the_tree_is_404(self) -> None:
        """/download/ lists nothing."""
        self.assertEqual(self.status("/download/"), 404)

    def test_prefix_directory_is_404(self) -> None:
        """/download/<prefix>/ lists nothing."""
        self.assertEqual(self.status(f"/download/{TID[:3]}/"), 404)

    def test_prefix_directory_without_slash_is_404(self) -> None:
        """/download/<prefix> is not a file."""
        self.assertEqual(self.status(f"/download/{TID[:3]}"), 404)

    def test_root_is_404(self) -> None:
        """The root serves nothing but a hint."""
        self.assertEqual(self.status("/"), 404)

    def test_extra_segment_after_the_id_is_404(self) -> None:
        """Nothing lives below a data file."""
        self.assertEqual(self.status(f"/download/{TID[:3]}/{TID}/x"), 404)

    def test_other_top_directory_is_404(self) -> None:
        """Only /download/ is served."""
        self.assertEqual(self.status(f"/repo/{TID[:3]}/{TID}"), 404)

    def test_non_ascii_segment_is_404(self) -> None:
        """Segments that are not ASCII are refused, not a crash."""
        self.assertEqual(self.status("/download/%C3%A9%C3%A9%C3%A9/x"), 404)

    def test_unknown_task_is_404(self) -> None:
        """A well-formed id without a data file is 404."""
        self.assertEqual(self.status(f"/download/{OTHER[:3]}/{OTHER}"), 404)

    def test_directory_named_like_a_task_is_404(self) -> None:
        """Only regular files are served, even at a task's path."""
        os.makedirs(self.cache.data_path(OTHER))
        self.assertEqual(self.status(f"/download/{OTHER[:3]}/{OTHER}"), 404)

    def test_other_methods_are_405(self) -> None:
        """PUT, DELETE and unknown methods on a data file: 405 with Allow, never twisted.web's 501."""
        for method in ("PUT", "DELETE", "FOO"):
            d = self.http.request(method, "http://cdn.test" + CdnCache.url_path(TID))
            self.http.flush()
            response = self.successResultOf(d)
            self.successResultOf(treq.content(response))
            self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")), (405, [b"GET, HEAD"]), method)
