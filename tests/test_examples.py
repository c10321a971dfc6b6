"""The example configs in etc/ stay loadable: docs point users at them."""

import os

from twisted.trial.unittest import SynchronousTestCase

from dfly.config import load_dfdaemon_config, load_dfget_config, load_supernode_config

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


class ExampleConfigTests(SynchronousTestCase):
    def test_dfget_example_loads(self) -> None:
        """etc/dfget.yml parses and names the local supernode."""
        config = load_dfget_config(os.path.join(ETC, "dfget.yml"), required=True)
        self.assertEqual(config.nodes, (("127.0.0.1", 8002),))
        self.assertEqual(config.min_rate, 64 * 1024)
        self.assertEqual((config.local_limit, config.total_limit), (10 << 20, None))

    def test_supernode_example_loads(self) -> None:
        """etc/supernode.yml parses with the documented default ports."""
        config = load_supernode_config(os.path.join(ETC, "supernode.yml"), required=True)
        self.assertEqual((config.port, config.download_port), (8002, 8001))
        self.assertEqual(config.fail_access_interval, 180.0)
        self.assertEqual((config.max_bandwidth, config.max_upload_bandwidth), (0, 0))

    def test_dfdaemon_example_loads(self) -> None:
        """etc/dfdaemon.yml parses: port 65001, loopback, blob URLs go p2p."""
        config = load_dfdaemon_config(os.path.join(ETC, "dfdaemon.yml"), required=True)
        self.assertEqual((config.port, config.listen, config.ratelimit), (65001, "127.0.0.1", 20 << 20))
        self.assertEqual([rule.action for rule in config.proxies], ["p2p"])
        self.assertTrue(config.proxies[0].regex.search("/v2/library/app/blobs/sha256:" + "a" * 64))
