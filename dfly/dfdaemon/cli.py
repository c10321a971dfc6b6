"""``dfdaemon``: the helper command next to the daemon.

The daemon itself runs under twistd (``twistd -n dfdaemon ...``), which
brings daemonizing, logging and reactor choice.  This command only does the
one-off set-up that has to happen before: ``dfdaemon gen-ca`` creates the CA
that HTTPS interception signs its certificates with.

The CA is made for named hosts only (``--host``, or the ``hijackHttps``
rules of ``--config``): its name constraints keep even its own key from
making a certificate that clients accept for any other host.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from twisted.python import usage

import dfly
from dfly.config import default_home, load_dfdaemon_config
from dfly.dfdaemon.ca import generate_ca


def default_ca_dir() -> str:
    return os.path.join(default_home(), "dfdaemon", "ca")


def _print_version() -> None:
    """Print the version and exit."""
    print(f"dfdaemon version:{dfly.__version__}")
    raise SystemExit(0)


class GenCaOptions(usage.Options):
    longdesc = (
        "Create a CA certificate (ca.crt) and its private key (ca.key) for HTTPS interception.  "
        "dfdaemon signs a certificate for each intercepted host with it, so clients must trust ca.crt."
    )
    optFlags = [["force", None, "Replace an existing CA (clients must then trust the new ca.crt)."]]
    optParameters = [
        ["dir", None, None, "Directory for ca.crt and ca.key [default: ~/.small-dragonfly/dfdaemon/ca]."],
        ["name", None, "dfly dfdaemon CA", "Common name of the CA certificate."],
        ["config", "c", None, "Also allow the hosts of this dfdaemon.yml's hijackHttps rules."],
    ]
    opt_version = staticmethod(_print_version)

    def __init__(self) -> None:
        super().__init__()
        self["host"] = []

    def opt_host(self, value: str) -> None:
        """A host the CA may sign for: a name (and the names under it), *.domain, or an IP address; repeat for more."""
        self["host"].append(value)

    def getSynopsis(self) -> str:
        # usage.Options would prefix the parent's whole synopsis.
        return "Usage: dfdaemon gen-ca (--host NAME ... | --config FILE) [--dir DIR] [--name CN] [--force]"

    def postOptions(self) -> None:
        hosts = list(self["host"])
        if self["config"] is not None:
            try:
                rules = load_dfdaemon_config(self["config"], required=True).hijack_hosts
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            for rule in rules:
                if rule.certificate_name is None:
                    assert rule.regex is not None
                    raise usage.UsageError(
                        f"hijackHttps rule {rule.regex.pattern!r} is a pattern, not a host: name constraints need "
                        "host names; use host: NAME or host: '*.domain' in the rule (or give --host)")
                hosts.append(rule.certificate_name)
        if not hosts:
            raise usage.UsageError("name the hosts the CA may sign for: --host NAME (repeat), or --config "
                                   "dfdaemon.yml with hijackHttps hosts")
        self["hosts"] = list(dict.fromkeys(hosts))


class Options(usage.Options):
    synopsis = "Usage: dfdaemon gen-ca [options]"
    longdesc = (
        "Set-up commands for dfdaemon, the registry mirror and HTTP(S) proxy.  The daemon itself "
        "runs as 'twistd -n dfdaemon' (see 'twistd dfdaemon --help' for its options)."
    )
    subCommands = [["gen-ca", None, GenCaOptions, "Create the CA for HTTPS interception (hijackHttps)."]]

    opt_version = staticmethod(_print_version)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing command: gen-ca (the daemon itself runs as 'twistd -n dfdaemon')")


def gen_ca(opts: GenCaOptions) -> int:
    directory = os.path.abspath(os.path.expanduser(opts["dir"] or default_ca_dir()))
    try:
        cert_path, key_path = generate_ca(directory, opts["name"], force=opts["force"], hosts=opts["hosts"])
    except FileExistsError as e:
        return _error(f"{e}; --force replaces it, and clients must then trust the new ca.crt")
    except OSError as e:
        return _error(f"cannot write the CA to {e.filename or directory}: {e.strerror}")
    except ValueError as e:
        return _error(str(e))
    print(f"CA certificate: {cert_path}")
    print(f"CA private key: {key_path}")
    print(f"It may sign for: {', '.join(opts['hosts'])}")
    print(
        f"Use them in dfdaemon.yml as 'hijackHttps: {{cert: {cert_path}, key: {key_path}}}'; clients must trust "
        "ca.crt (skopeo: --src-cert-dir DIR with ca.crt in DIR; docker: /etc/docker/certs.d/<host>/ca.crt)."
    )
    return 0


def _error(message: str) -> int:
    print(f"dfdaemon: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> None:
    opts = Options()
    try:
        opts.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        print(f"dfdaemon: error: {e}", file=sys.stderr)
        print("Try 'dfdaemon --help' for the options.", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(gen_ca(opts.subOptions))


if __name__ == "__main__":
    main()
