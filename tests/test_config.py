"""Tests for dfly.config: units, nodes, the home layout and the YAML files."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from dfly.config import (
    DEFAULT_DOWNLOAD_PORT,
    DEFAULT_SUPERNODE_PORT,
    DfgetFileConfig,
    Home,
    SupernodeFileConfig,
    load_dfdaemon_config,
    load_dfget_config,
    load_supernode_config,
    parse_duration,
    parse_node,
    parse_nodes,
    parse_size,
)


class ParseSizeTests(SynchronousTestCase):
    def test_megabytes(self) -> None:
        """'10M' is ten binary megabytes."""
        self.assertEqual(parse_size("10M"), 10 * 1024 * 1024)

    def test_kilobytes(self) -> None:
        """'512K' is 512 KiB."""
        self.assertEqual(parse_size("512K"), 512 * 1024)

    def test_gigabytes(self) -> None:
        """'1G' is one GiB."""
        self.assertEqual(parse_size("1G"), 1 << 30)

    def test_b_suffix_is_allowed(self) -> None:
        """'20MB' means the same as '20M'."""
        self.assertEqual(parse_size("20MB"), 20 << 20)

    def test_lower_case_unit(self) -> None:
        """Units are case-insensitive."""
        self.assertEqual(parse_size("10m"), 10 << 20)

    def test_zero(self) -> None:
        """'0' (unlimited) parses to 0."""
        self.assertEqual(parse_size("0"), 0)

    def test_plain_digits_are_bytes(self) -> None:
        """A bare number is a byte count."""
        self.assertEqual(parse_size("4096"), 4096)

    def test_int_passes_through(self) -> None:
        """An int from YAML is taken as bytes."""
        self.assertEqual(parse_size(65536), 65536)

    def test_unknown_unit_is_rejected(self) -> None:
        """'10X' is not a size."""
        self.assertRaises(ValueError, parse_size, "10X")

    def test_negative_string_is_rejected(self) -> None:
        """'-1' is not a size."""
        self.assertRaises(ValueError, parse_size, "-1")

    def test_negative_int_is_rejected(self) -> None:
        """-1 from YAML is not a size."""
        self.assertRaises(ValueError, parse_size, -1)

    def test_empty_is_rejected(self) -> None:
        """An empty string is not a size."""
        self.assertRaises(ValueError, parse_size, "")

    def test_bool_is_rejected(self) -> None:
        """YAML 'yes' (True) is not a size, although bool is an int."""
        self.assertRaises(ValueError, parse_size, True)

    def test_error_is_readable(self) -> None:
        """The message quotes the value and shows an example, on one line."""
        error = self.assertRaises(ValueError, parse_size, "10X")
        self.assertIn("'10X'", str(error))
        self.assertIn("10M", str(error))
        self.assertNotIn("\n", str(error))


class ParseDurationTests(SynchronousTestCase):
    def test_plain_number_is_seconds(self) -> None:
        """'300' is 300 seconds."""
        self.assertEqual(parse_duration("300"), 300.0)

    def test_seconds(self) -> None:
        """'90s' is 90 seconds."""
        self.assertEqual(parse_duration("90s"), 90.0)

    def test_minutes(self) -> None:
        """'5m' is 300 seconds."""
        self.assertEqual(parse_duration("5m"), 300.0)

    def test_go_style_compound(self) -> None:
        """'3m0s' (Go's formatting) is 180 seconds."""
        self.assertEqual(parse_duration("3m0s"), 180.0)

    def test_hours_and_minutes(self) -> None:
        """'1h30m' is 5400 seconds."""
        self.assertEqual(parse_duration("1h30m"), 5400.0)

    def test_milliseconds(self) -> None:
        """'250ms' is a quarter second, not 250 minutes."""
        self.assertEqual(parse_duration("250ms"), 0.25)

    def test_number_passes_through(self) -> None:
        """A number from YAML is seconds."""
        self.assertEqual(parse_duration(2.5), 2.5)

    def test_unknown_unit_is_rejected(self) -> None:
        """'5d' is not a duration."""
        self.assertRaises(ValueError, parse_duration, "5d")

    def test_trailing_number_without_unit_is_rejected(self) -> None:
        """'1h30' leaves a bare number after a unit."""
        self.assertRaises(ValueError, parse_duration, "1h30")

    def test_negative_is_rejected(self) -> None:
        """'-5s' is not a duration."""
        self.assertRaises(ValueError, parse_duration, "-5s")

    def test_negative_number_is_rejected(self) -> None:
        """-1 from YAML is not a duration."""
        self.assertRaises(ValueError, parse_duration, -1)

    def test_empty_is_rejected(self) -> None:
        """An empty string is not a duration."""
        self.assertRaises(ValueError, parse_duration, "")

    def test_words_are_rejected(self) -> None:
        """'soon' is not a duration."""
        self.assertRaises(ValueError, parse_duration, "soon")

    def test_error_is_readable(self) -> None:
        """The message quotes the value and gives examples."""
        error = self.assertRaises(ValueError, parse_duration, "5d")
        self.assertIn("'5d'", str(error))
        self.assertIn("90s", str(error))


class ParseNodeTests(SynchronousTestCase):
    def test_host_gets_default_port(self) -> None:
        """A bare host uses port 8002."""
        self.assertEqual(parse_node("sn.example.com"), ("sn.example.com", 8002))

    def test_host_and_port(self) -> None:
        """'host:port' gives both."""
        self.assertEqual(parse_node("10.0.0.1:9000"), ("10.0.0.1", 9000))

    def test_surrounding_whitespace_is_ignored(self) -> None:
        """Spaces around a node are stripped."""
        self.assertEqual(parse_node(" a:1 "), ("a", 1))

    def test_port_out_of_range_is_rejected(self) -> None:
        """'h:99999' is not a port."""
        self.assertRaises(ValueError, parse_node, "h:99999")

    def test_port_zero_is_rejected(self) -> None:
        """Port 0 cannot be connected to."""
        self.assertRaises(ValueError, parse_node, "h:0")

    def test_empty_port_is_rejected(self) -> None:
        """'h:' has no port."""
        self.assertRaises(ValueError, parse_node, "h:")

    def test_non_numeric_port_is_rejected(self) -> None:
        """'h:http' is rejected."""
        self.assertRaises(ValueError, parse_node, "h:http")

    def test_empty_host_is_rejected(self) -> None:
        """':8002' has no host."""
        self.assertRaises(ValueError, parse_node, ":8002")

    def test_invalid_host_characters_are_rejected(self) -> None:
        """A host with a slash is rejected."""
        self.assertRaises(ValueError, parse_node, "http://h")

    def test_bracketed_ipv6_with_port(self) -> None:
        """'[::1]:9000' is IPv6 loopback, port 9000."""
        self.assertEqual(parse_node("[::1]:9000"), ("::1", 9000))

    def test_bracketed_ipv6_without_port(self) -> None:
        """'[fe80::1]' gets the default port."""
        self.assertEqual(parse_node("[fe80::1]"), ("fe80::1", 8002))

    def test_junk_after_bracket_is_rejected(self) -> None:
        """'[::1]x' is rejected."""
        self.assertRaises(ValueError, parse_node, "[::1]x")

    def test_bracketed_ipv6_bad_port_is_rejected(self) -> None:
        """'[::1]:70000' is rejected."""
        self.assertRaises(ValueError, parse_node, "[::1]:70000")

    def test_unclosed_bracket_is_rejected(self) -> None:
        """'[::1' (missing ']') is malformed, not ::1."""
        self.assertRaises(ValueError, parse_node, "[::1")

    def test_bare_ipv6_gets_default_port(self) -> None:
        """An unbracketed IPv6 address is a host without a port."""
        self.assertEqual(parse_node("fe80::1"), ("fe80::1", 8002))

    def test_host_with_two_ports_is_rejected(self) -> None:
        """'h:80:90' is neither host:port nor an IPv6 address."""
        self.assertRaises(ValueError, parse_node, "sn.example.com:80:90")

    def test_port_error_names_the_node(self) -> None:
        """A bad port's message quotes the whole node."""
        error = self.assertRaises(ValueError, parse_node, "h:99999")
        self.assertIn("'h:99999'", str(error))


class ParseNodesTests(SynchronousTestCase):
    def test_comma_list(self) -> None:
        """'a,b:9000' is two nodes, in order."""
        self.assertEqual(parse_nodes("a,b:9000"), (("a", 8002), ("b", 9000)))

    def test_list_of_comma_lists(self) -> None:
        """Repeated --node flags, each possibly a comma list, are concatenated."""
        self.assertEqual(parse_nodes(["a,b", "c"]), (("a", 8002), ("b", 8002), ("c", 8002)))

    def test_empty_items_are_skipped(self) -> None:
        """Blank entries between commas are ignored."""
        self.assertEqual(parse_nodes("a,, b ,"), (("a", 8002), ("b", 8002)))

    def test_ipv6_in_list(self) -> None:
        """A bracketed IPv6 node works inside a list."""
        self.assertEqual(parse_nodes("[::1]:9000,h"), (("::1", 9000), ("h", 8002)))

    def test_non_string_item_is_rejected(self) -> None:
        """A YAML number in the list is rejected."""
        self.assertRaises(ValueError, parse_nodes, ["a", 5])

    def test_one_bad_node_rejects_the_list(self) -> None:
        """A bad port anywhere fails the whole list."""
        self.assertRaises(ValueError, parse_nodes, "a,h:99999")


class HomeTests(SynchronousTestCase):
    def test_paths(self) -> None:
        """logs/, meta/ and data/ sit under the root."""
        home = Home("/h")
        self.assertEqual((home.logs, home.meta, home.data), ("/h/logs", "/h/meta", "/h/data"))

    def test_meta_files(self) -> None:
        """host.meta and daemon.lock live in meta/."""
        home = Home("/h")
        self.assertEqual((home.host_meta, home.daemon_lock), ("/h/meta/host.meta", "/h/meta/daemon.lock"))

    def test_log_file(self) -> None:
        """Log files live in logs/."""
        self.assertEqual(Home("/h").log_file("dfclient.log"), "/h/logs/dfclient.log")

    def test_ensure_creates_the_tree(self) -> None:
        """ensure() creates the root and its three directories."""
        home = Home(os.path.join(self.mktemp(), "home")).ensure()
        self.assertEqual(sorted(os.listdir(home.root)), ["data", "logs", "meta"])

    def test_ensure_makes_owner_only_directories(self) -> None:
        """meta/ (which holds the API token) is not readable by others."""
        home = Home(self.mktemp()).ensure()
        self.assertEqual(stat.S_IMODE(os.stat(home.meta).st_mode) & 0o077, 0)

    def test_ensure_is_idempotent(self) -> None:
        """A second ensure() on an existing tree succeeds and keeps files."""
        home = Home(self.mktemp()).ensure()
        with open(home.host_meta, "w") as f:
            f.write("x")
        self.assertIs(home.ensure(), home)
        self.assertTrue(os.path.exists(home.host_meta))


class _YamlFiles(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class LoadDfgetConfigTests(_YamlFiles):
    def test_valid_keys(self) -> None:
        """nodes, minRate and timeout are parsed with their units."""
        path = self.write("nodes: [a, 'b:9000']\nminRate: 10M\ntimeout: 5m\n")
        self.assertEqual(
            load_dfget_config(path),
            DfgetFileConfig(nodes=(("a", 8002), ("b", 9000)), min_rate=10 << 20, timeout=300.0),
        )

    def test_nodes_as_comma_string(self) -> None:
        """nodes may be a comma-separated string."""
        path = self.write("nodes: a,b\n")
        self.assertEqual(load_dfget_config(path).nodes, (("a", 8002), ("b", 8002)))

    def test_empty_file_gives_defaults(self) -> None:
        """An empty file sets nothing."""
        self.assertEqual(load_dfget_config(self.write("")), DfgetFileConfig())

    def test_missing_optional_file_gives_defaults(self) -> None:
        """An absent default config file is not an error."""
        self.assertEqual(load_dfget_config(self.mktemp()), DfgetFileConfig())

    def test_missing_required_file_is_rejected(self) -> None:
        """A file named on the command line must exist."""
        path = self.mktemp()
        error = self.assertRaises(ValueError, load_dfget_config, path, required=True)
        self.assertIn(path, str(error))

    def test_unknown_key_is_rejected_by_name(self) -> None:
        """A misspelt key is named in the error."""
        error = self.assertRaises(ValueError, load_dfget_config, self.write("minrate: 10M\n"))
        self.assertIn("'minrate'", str(error))

    def test_bad_value_names_the_key(self) -> None:
        """A bad size names its key."""
        error = self.assertRaises(ValueError, load_dfget_config, self.write("minRate: 10X\n"))
        self.assertIn("'minRate'", str(error))

    def test_wrong_type_names_the_key(self) -> None:
        """A number where nodes are expected is a ValueError naming the key."""
        error = self.assertRaises(ValueError, load_dfget_config, self.write("nodes: 5\n"))
        self.assertIn("'nodes'", str(error))

    def test_deeply_nested_yaml_is_a_one_line_error(self) -> None:
        """PyYAML recurses per nesting level: ``[[[[...`` must be a ValueError, not a RecursionError."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("port: " + "[" * 20_000 + "\n"))
        self.assertIn("nested too deeply", str(error))

    def test_malformed_yaml_is_rejected(self) -> None:
        """A YAML syntax error is a one-line ValueError naming the file."""
        path = self.write("nodes: [a, b\n")
        error = self.assertRaises(ValueError, load_dfget_config, path)
        self.assertIn(path, str(error))
        self.assertNotIn("\n", str(error))

    def test_list_at_top_level_is_rejected(self) -> None:
        """The file must hold a mapping, not a list."""
        self.assertRaises(ValueError, load_dfget_config, self.write("- a\n- b\n"))

    def test_scalar_at_top_level_is_rejected(self) -> None:
        """The file must hold a mapping, not a string."""
        self.assertRaises(ValueError, load_dfget_config, self.write("hello\n"))

    def test_undecodable_file_error_names_the_file(self) -> None:
        """A file that is not UTF-8 is a ValueError naming the file."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"minRate: caf\xe9\n")
        error = self.assertRaises(ValueError, load_dfget_config, path)
        self.assertIn(path, str(error))

    def test_directory_is_rejected(self) -> None:
        """A directory given as the config file is a ValueError, not a traceback."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertRaises(ValueError, load_dfget_config, path, required=True)


class LoadSupernodeConfigTests(_YamlFiles):
    def test_valid_keys(self) -> None:
        """Every supernode key is read and converted."""
        path = self.write(
            "port: 9002\n"
            "downloadPort: 9001\n"
            "listen: 127.0.0.1\n"
            "home: /srv/sn\n"
            "advertiseIp: 10.0.0.5\n"
            "failAccessInterval: 3m0s\n"
            "pollTimeout: 250ms\n"
        )
        self.assertEqual(
            load_supernode_config(path),
            SupernodeFileConfig(
                port=9002,
                download_port=9001,
                listen="127.0.0.1",
                home="/srv/sn",
                advertise_ip="10.0.0.5",
                fail_access_interval=180.0,
                poll_timeout=0.25,
            ),
        )

    def test_missing_optional_file_gives_defaults(self) -> None:
        """Without a file, the supernode listens on 8002/8001 on all addresses."""
        config = load_supernode_config(self.mktemp())
        self.assertEqual(
            (config.port, config.download_port, config.listen, config.advertise_ip),
            (DEFAULT_SUPERNODE_PORT, DEFAULT_DOWNLOAD_PORT, "0.0.0.0", None),
        )

    def test_missing_required_file_is_rejected(self) -> None:
        """A file named on the command line must exist."""
        self.assertRaises(ValueError, load_supernode_config, self.mktemp(), required=True)

    def test_unknown_key_is_rejected_by_name(self) -> None:
        """An unknown key is named, with the known keys listed."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("prot: 1\n"))
        self.assertIn("'prot'", str(error))
        self.assertIn("port", str(error))

    def test_port_as_string_names_the_key(self) -> None:
        """port must be a number."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("port: '8002'\n"))
        self.assertIn("'port'", str(error))

    def test_port_out_of_range_names_the_key(self) -> None:
        """downloadPort 70000 is rejected by name."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("downloadPort: 70000\n"))
        self.assertIn("'downloadPort'", str(error))

    def test_bool_port_is_rejected(self) -> None:
        """YAML 'yes' is not a port."""
        self.assertRaises(ValueError, load_supernode_config, self.write("port: yes\n"))

    def test_bad_ip_names_the_key(self) -> None:
        """listen must be an IP address."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("listen: localhost\n"))
        self.assertIn("'listen'", str(error))

    def test_empty_home_names_the_key(self) -> None:
        """home must be a non-empty string."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("home: ''\n"))
        self.assertIn("'home'", str(error))

    def test_bad_duration_names_the_key(self) -> None:
        """pollTimeout must be a duration."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("pollTimeout: soon\n"))
        self.assertIn("'pollTimeout'", str(error))

    def test_malformed_yaml_is_rejected(self) -> None:
        """A YAML syntax error is a ValueError."""
        self.assertRaises(ValueError, load_supernode_config, self.write("port: [\n"))

    def test_list_at_top_level_is_rejected(self) -> None:
        """The file must hold a mapping."""
        error = self.assertRaises(ValueError, load_supernode_config, self.write("- port\n"))
        self.assertIn("mapping", str(error))


class ClusterKeyTests(_YamlFiles):
    """``clusterToken`` in all three files, ``clusterCa`` in dfget.yml and dfdaemon.yml, TLS in supernode.yml."""

    LOADERS = (load_dfget_config, load_supernode_config, load_dfdaemon_config)

    def test_token_in_every_file(self) -> None:
        path = self.write("clusterToken: s3cret-Token_1\n")
        for load in self.LOADERS:
            self.assertEqual(load(path).cluster_token, "s3cret-Token_1", load.__name__)

    def test_token_defaults_to_none(self) -> None:
        path = self.write("{}\n")
        for load in self.LOADERS:
            self.assertIsNone(load(path).cluster_token, load.__name__)

    def test_token_stays_out_of_repr(self) -> None:
        path = self.write("clusterToken: s3cret-Token_1\n")
        for load in self.LOADERS:
            self.assertNotIn("s3cret", repr(load(path)), load.__name__)

    def test_unusable_tokens_are_config_errors(self) -> None:
        """Empty, whitespace, control characters, non-ASCII, too long, not a string: one line, no value repeated."""
        for text in ('""', '"   "', '"two words"', '"tab\\there"', '"nul\\0"', '"caf\\u00e9"', '"' + "x" * 257 + '"',
                     "12345", "[a]", "null"):
            path = self.write(f"clusterToken: {text}\n")
            for load in self.LOADERS:
                error = self.assertRaises(ValueError, load, path)
                self.assertIn("clusterToken", str(error), (text, load.__name__))
                self.assertNotIn("\n", str(error))
                if len(text) > 6:
                    self.assertNotIn(text.strip('"'), str(error))

    def test_cluster_ca(self) -> None:
        path = self.write("clusterCa: /etc/dragonfly/cluster-ca.pem\n")
        self.assertEqual(load_dfget_config(path).cluster_ca, "/etc/dragonfly/cluster-ca.pem")
        self.assertEqual(load_dfdaemon_config(path).cluster_ca, "/etc/dragonfly/cluster-ca.pem")
        self.assertRaises(ValueError, load_supernode_config, path)  # the supernode serves TLS, it does not dial it

    def test_tls_pair(self) -> None:
        path = self.write("tlsCert: /c.pem\ntlsKey: /k.pem\n")
        config = load_supernode_config(path)
        self.assertEqual((config.tls_cert, config.tls_key), ("/c.pem", "/k.pem"))

    def test_tls_halves_are_refused(self) -> None:
        for text in ("tlsCert: /c.pem\n", "tlsKey: /k.pem\n"):
            error = self.assertRaises(ValueError, load_supernode_config, self.write(text))
            self.assertIn("tlsCert and tlsKey go together", str(error))
