"""Where the bandwidth limits come from and where they end up.

Flags, ``dfget.yml``, ``supernode.yml`` and the local API's JSON all feed
the same buckets; these tests follow each value from its source to the
bucket that enforces it.  The buckets' own arithmetic and the producers are
tested in tests/test_ratelimit.py, real pacing in tests/test_integration.py.
"""

from __future__ import annotations

import os

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from dfly.config import DEFAULT_LOCAL_LIMIT, SupernodeFileConfig, load_dfget_config, load_supernode_config
from dfly.peer import cli
from dfly.peer.options import Options as PeerOptions
from dfly.peer.options import PeerConfig
from dfly.peer.request import DownloadRequest, request_from_json, request_to_json
from dfly.peer.tap import build_service as build_peer
from dfly.ratelimit import FileRangeProducer, HostLimit, TokenBucket
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.supernode.tap import Options as SupernodeOptions
from dfly.supernode.tap import build_service as build_supernode

MiB = 1 << 20
TID = "ab" + "c" * 62


def write(testcase: SynchronousTestCase, text: str) -> str:
    path = testcase.mktemp()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class DfgetFileTests(SynchronousTestCase):
    def test_defaults_are_10m_per_download_and_no_host_limit(self) -> None:
        """Without dfget.yml a download is limited to the FAQ's 10M and the host limit is left alone."""
        config = load_dfget_config(self.mktemp())
        self.assertEqual((config.local_limit, config.total_limit), (10 * MiB, None))

    def test_limits_are_read_with_units(self) -> None:
        """localLimit and totalLimit take the same units as the flags."""
        config = load_dfget_config(write(self, "localLimit: 20M\ntotalLimit: 512K\n"))
        self.assertEqual((config.local_limit, config.total_limit), (20 * MiB, 512 << 10))

    def test_bad_limit_names_the_key(self) -> None:
        """A limit that is not a size is refused, naming its key."""
        error = self.assertRaises(ValueError, load_dfget_config, write(self, "totalLimit: fast\n"))
        self.assertIn("'totalLimit'", str(error))


class DfgetFlagTests(SynchronousTestCase):
    def parse(self, *args: str) -> DownloadRequest:
        opts = cli.Options()
        opts.parseOptions(["-u", "http://origin.test/f.bin", "-o", os.path.abspath(self.mktemp()), *args])
        return opts["request"]

    def test_locallimit_defaults_to_10m(self) -> None:
        """dfget without -s downloads at most 10 MiB/s."""
        self.assertEqual(self.parse("--config", write(self, "{}\n")).local_limit, DEFAULT_LOCAL_LIMIT)

    def test_short_flag_and_zero(self) -> None:
        """-s 0 lifts the per-download limit."""
        self.assertEqual(self.parse("-s", "0").local_limit, 0)

    def test_totallimit_is_passed_on(self) -> None:
        """--totallimit 40M asks the daemon for a 40 MiB/s host limit."""
        self.assertEqual(self.parse("--totallimit", "40M").total_limit, 40 * MiB)

    def test_without_totallimit_the_host_limit_is_unchanged(self) -> None:
        """No flag and no key: the request does not touch the host limit."""
        self.assertIsNone(self.parse("--config", write(self, "{}\n")).total_limit)

    def test_file_values_apply_and_flags_win(self) -> None:
        """dfget.yml sets both limits; a flag overrides its key."""
        config = write(self, "localLimit: 2M\ntotalLimit: 8M\n")
        req = self.parse("--config", config, "--locallimit", "3M")
        self.assertEqual((req.local_limit, req.total_limit), (3 * MiB, 8 * MiB))

    def test_bad_locallimit_is_a_usage_error_naming_the_flag(self) -> None:
        """-s fast is refused with the flag's name."""
        error = self.assertRaises(usage.UsageError, self.parse, "-s", "fast")
        self.assertIn("--locallimit", str(error))


class RequestJsonTests(SynchronousTestCase):
    def test_limits_survive_the_local_api(self) -> None:
        """The daemon sees the limits the CLI parsed."""
        req = DownloadRequest("http://o.test/f", "/tmp/out", "1-1.000", local_limit=3 * MiB, total_limit=0)
        back = request_from_json(request_to_json(req))
        self.assertEqual((back.local_limit, back.total_limit), (3 * MiB, 0))

    def test_missing_limits_mean_default_and_unchanged(self) -> None:
        """An older client that sends no limits gets 10M per download and leaves the host limit."""
        body = {"url": "http://o.test/f", "output": "/tmp/out", "sign": "1-1.000"}
        req = request_from_json(body)
        self.assertEqual((req.local_limit, req.total_limit), (DEFAULT_LOCAL_LIMIT, None))

    def test_negative_limit_is_refused(self) -> None:
        """A negative rate is a ValueError (the local API answers 400)."""
        body = {"url": "http://o.test/f", "output": "/tmp/out", "sign": "1-1.000", "localLimit": -1}
        self.assertRaises(ValueError, request_from_json, body)


class PeerDaemonTests(SynchronousTestCase):
    def config(self, *args: str) -> PeerConfig:
        opts = PeerOptions()
        opts.parseOptions(["--home", self.mktemp(), *args])
        return opts["config_obj"]

    def test_totallimit_flag(self) -> None:
        """dfget server --totallimit 40M."""
        self.assertEqual(self.config("--totallimit", "40M").total_limit, 40 * MiB)

    def test_totallimit_from_the_config_file(self) -> None:
        """Without the flag the daemon takes totalLimit from dfget.yml."""
        self.assertEqual(self.config("--config", write(self, "totalLimit: 5M\n")).total_limit, 5 * MiB)

    def test_no_limit_by_default(self) -> None:
        """No flag, no key: the host is not limited."""
        self.assertEqual(self.config("--config", write(self, "{}\n")).total_limit, 0)

    def test_bad_totallimit_names_the_flag(self) -> None:
        """A bad value is a usage error naming --totallimit."""
        error = self.assertRaises(usage.UsageError, self.config, "--totallimit", "lots")
        self.assertIn("--totallimit", str(error))

    def test_downloads_and_uploads_share_the_host_limit(self) -> None:
        """The engine's receive bucket and the uploader's send bucket are the one host limit."""
        parts = build_peer(PeerConfig(home=self.mktemp(), total_limit=7 * MiB), MemoryReactorClock())
        self.assertIs(parts.uploads.bucket, parts.engine.limit.tx)
        self.assertEqual((parts.engine.limit.rx.rate, parts.engine.limit.tx.rate), (7 * MiB, 7 * MiB))


class HostLimitTests(SynchronousTestCase):
    def test_each_direction_has_its_own_credit(self) -> None:
        """Receiving at the limit does not use up the credit for sending."""
        limit = HostLimit(MiB, Clock())
        limit.rx.charge(int(limit.rx.burst))
        self.assertEqual(limit.tx.reserve(64 << 10), 0.0)

    def test_set_rate_changes_both_directions(self) -> None:
        """--totallimit from a later dfget run applies to RX and TX alike."""
        limit = HostLimit(MiB, Clock())
        limit.set_rate(3 * MiB)
        self.assertEqual((limit.rate, limit.rx.rate, limit.tx.rate), (3 * MiB, 3 * MiB, 3 * MiB))


class SupernodeTests(SynchronousTestCase):
    def test_file_keys(self) -> None:
        """maxBandwidth and maxUploadBandwidth in supernode.yml."""
        config = load_supernode_config(write(self, "maxBandwidth: 200M\nmaxUploadBandwidth: 100M\n"))
        self.assertEqual((config.max_bandwidth, config.max_upload_bandwidth), (200 * MiB, 100 * MiB))

    def test_unlimited_by_default(self) -> None:
        """Without settings neither direction is limited."""
        config = SupernodeFileConfig()
        self.assertEqual((config.max_bandwidth, config.max_upload_bandwidth), (0, 0))

    def test_flags_override_the_file(self) -> None:
        """--max-bandwidth and --max-upload-bandwidth win over the file."""
        opts = SupernodeOptions()
        opts.parseOptions([
            "--config", write(self, "maxBandwidth: 200M\nmaxUploadBandwidth: 100M\n"),
            "--max-bandwidth", "50M", "--max-upload-bandwidth", "0",
        ])
        config = opts["config_obj"]
        self.assertEqual((config.max_bandwidth, config.max_upload_bandwidth), (50 * MiB, 0))

    def test_bad_flag_is_a_usage_error(self) -> None:
        """A bad bandwidth is refused before anything starts."""
        self.assertRaises(usage.UsageError, SupernodeOptions().parseOptions, ["--max-bandwidth", "x"])

    def test_source_fetches_draw_from_max_bandwidth(self) -> None:
        """Every source fetch of the task manager draws from one --max-bandwidth bucket."""
        config = SupernodeFileConfig(home=self.mktemp(), max_bandwidth=30 * MiB)
        parts = build_supernode(config, MemoryReactorClock())
        self.assertEqual(parts.tasks.source_bucket.rate, 30 * MiB)


class CdnPacingTests(SynchronousTestCase):
    """The CDN port sends through its upload bucket (Dragonfly's nginx had no limit)."""

    def setUp(self) -> None:
        self.cache = CdnCache(self.mktemp())
        self.data = os.urandom(1 * MiB)
        fd = self.cache.open_for_write(TID)
        os.write(fd, self.data)
        os.close(fd)
        self.clock = Clock()

    def get(self, bucket: TokenBucket, byte_range: str) -> bytes:
        stub = StubTreq(CdnFiles(self.cache, self.clock, bucket))
        d = stub.get("http://cdn.test" + CdnCache.url_path(TID), headers={"Range": byte_range})
        for _ in range(10_000):
            stub.flush()
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            self.clock.advance(min(c.getTime() for c in calls) - self.clock.seconds())
        response = self.successResultOf(d)
        body = self.successResultOf(stub.content(response))
        return body

    def test_range_is_paced_at_the_upload_limit(self) -> None:
        """512 KiB at 256 KiB/s after the burst: exact bytes, (size - burst) / rate seconds."""
        bucket = TokenBucket(256 << 10, self.clock)
        body = self.get(bucket, "bytes=0-524287")
        self.assertEqual(body, self.data[: 512 << 10])
        self.assertAlmostEqual(self.clock.seconds(), ((512 << 10) - bucket.burst) / (256 << 10), places=6)

    def test_unlimited_bucket_sends_at_once(self) -> None:
        """Rate 0: the whole range without waiting."""
        body = self.get(TokenBucket(0, self.clock), "bytes=0-1048575")
        self.assertEqual((body, self.clock.seconds()), (self.data, 0))


class ProducerInterfaceTests(SynchronousTestCase):
    def test_file_range_producer_is_a_push_producer(self) -> None:
        """Transports call pause/resume/stop on it: it must provide IPushProducer."""
        fd = os.open(os.devnull, os.O_RDONLY)
        producer = FileRangeProducer(None, fd, 0, 0, Clock())  # type: ignore[arg-type]
        self.addCleanup(os.close, fd)
        self.assertTrue(verifyObject(IPushProducer, producer))


class ChannelPacingTests(SynchronousTestCase):
    """A paced CDN response through a real HTTPChannel on a MemoryReactorClock.

    The transport's back-pressure (HTTPChannel.pauseProducing, as TCP calls
    it when its send buffer is full) and the bucket both hold the producer;
    the response goes on only when both let it.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        cache = CdnCache(self.mktemp())
        self.data = os.urandom(1 * MiB)
        fd = cache.open_for_write(TID)
        os.write(fd, self.data)
        os.close(fd)
        self.bucket = TokenBucket(256 << 10, self.reactor)
        site = Site(CdnFiles(cache, self.reactor, self.bucket), reactor=self.reactor)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8001))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def body_bytes(self) -> int:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        return len(body)

    def get(self) -> None:
        path = CdnCache.url_path(TID)
        self.channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: cdn\r\nRange: bytes=0-524287\r\n\r\n".encode())

    def test_burst_then_one_chunk_per_credit(self) -> None:
        """The burst leaves at once, then each 64 KiB waits for its credit on the reactor's clock."""
        self.get()
        self.assertEqual(self.body_bytes(), int(self.bucket.burst))
        self.reactor.advance((64 << 10) / (256 << 10))
        self.assertEqual(self.body_bytes(), int(self.bucket.burst) + (64 << 10))

    def test_transport_pause_holds_even_with_credit(self) -> None:
        """While the transport is paused, credit piles up but nothing is written; resuming sends it."""
        self.get()
        self.transport.producer.pauseProducing()  # what TCP does when its send buffer is full
        before = self.body_bytes()
        self.reactor.advance(1.0)
        self.assertEqual(self.body_bytes(), before)
        self.transport.producer.resumeProducing()
        self.assertGreater(self.body_bytes(), before)

    def test_whole_range_arrives_exactly(self) -> None:
        """Advancing the clock long enough delivers exactly the range, and the response completes."""
        self.get()
        for _ in range(100):
            self.reactor.advance(0.25)
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertEqual((head.split(b"\r\n")[0], body), (b"HTTP/1.1 206 Partial Content", self.data[: 512 << 10]))
