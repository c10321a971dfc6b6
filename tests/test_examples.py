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

    def test_supernode_example_states_the_defaults(self) -> None:
        """etc/supernode.yml's limits and scheduler policy are the code's defaults, so it documents them."""
        from dfly.config import SupernodeFileConfig
        from dfly.supernode.policy import SchedulerPolicy, policy_from_mapping

        config = load_supernode_config(os.path.join(ETC, "supernode.yml"), required=True)
        self.assertEqual(policy_from_mapping(config.scheduler), SchedulerPolicy())
        defaults = SupernodeFileConfig()
        for field in ("task_expire_time", "access_expire_time", "revalidate_window", "cache_limit", "max_tasks",
                      "max_peers_per_task", "max_fetches", "max_file_size", "disk_threads", "access_log"):
            self.assertEqual(getattr(config, field), getattr(defaults, field), field)

    def test_dfdaemon_example_loads(self) -> None:
        """etc/dfdaemon.yml parses: port 65001, loopback, blob URLs go p2p."""
        config = load_dfdaemon_config(os.path.join(ETC, "dfdaemon.yml"), required=True)
        self.assertEqual((config.port, config.listen, config.ratelimit), (65001, "127.0.0.1", 20 << 20))
        self.assertEqual([rule.action for rule in config.proxies], ["p2p"])
        self.assertTrue(config.proxies[0].regex.search("/v2/library/app/blobs/sha256:" + "a" * 64))

    def test_dfdaemon_example_states_the_access_defaults(self) -> None:
        """etc/dfdaemon.yml's connectPorts is the default (443 only) and it sets no proxyAuth."""
        from dfly.config import DfdaemonFileConfig

        config = load_dfdaemon_config(os.path.join(ETC, "dfdaemon.yml"), required=True)
        self.assertEqual(config.connect_ports, DfdaemonFileConfig().connect_ports)
        self.assertEqual(config.connect_ports, (443,))
        self.assertEqual(config.proxy_auth, ())
