"""A node name stands for every address it resolves to, looked up again every 30 s (`dfly.peer.nodenames`)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dfly.peer.nodenames import RESOLVE_EVERY, NodeNames
from dfly.placement import rendezvous_order


@implementer(IHostnameResolver)
class Resolver:
    """A DNS whose answers the test sets; ``answer=None`` never completes (a hung lookup)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Any] | None] = {}
        self.lookups: list[str] = []

    def resolveHostName(self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> IResolutionReceiver:
        self.lookups.append(hostName)
        receiver.resolutionBegan(None)
        answer = self.answers.get(hostName, [])
        if answer is None:
            return receiver
        for address in answer:
            receiver.addressResolved(address)
        receiver.resolutionComplete()
        return receiver


class Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.nameResolver = Resolver()


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 0)


class NodeNamesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Reactor()
        self.dns = self.reactor.nameResolver
        self.names = NodeNames(self.reactor, timeout=3.0)

    def expand(self, *nodes: tuple[str, int]) -> tuple[tuple[str, int], ...]:
        return self.successResultOf(Deferred.fromCoroutine(self.names.expand(nodes)))

    def test_a_name_with_several_addresses_is_several_nodes(self) -> None:
        """A headless Service: each address a node of its own, on the name's port."""
        self.dns.answers["sn.dfly"] = [v4("10.0.0.7"), v4("10.0.0.5"), v4("10.0.0.6")]
        self.assertEqual(self.expand(("sn.dfly", 8002)), (("10.0.0.5", 8002), ("10.0.0.6", 8002), ("10.0.0.7", 8002)))

    def test_peers_that_get_the_addresses_in_any_order_agree_on_the_task_s_node(self) -> None:
        self.dns.answers["sn.dfly"] = [v4("10.0.0.7"), v4("10.0.0.5"), v4("10.0.0.6")]
        first = self.expand(("sn.dfly", 8002))
        other = NodeNames(Reactor())
        other.reactor.nameResolver.answers["sn.dfly"] = [v4("10.0.0.6"), v4("10.0.0.7"), v4("10.0.0.5")]
        second = self.successResultOf(Deferred.fromCoroutine(other.expand((("sn.dfly", 8002),))))
        self.assertEqual(rendezvous_order("task", first), rendezvous_order("task", second))

    def test_addresses_are_not_looked_up_and_duplicates_go(self) -> None:
        self.dns.answers["a.dfly"] = [v4("10.0.0.1")]
        self.assertEqual(self.expand(("10.0.0.1", 8002), ("a.dfly", 8002), ("::1", 8002), ("10.0.0.1", 8002)),
                         (("10.0.0.1", 8002), ("::1", 8002)))
        self.assertEqual(self.dns.lookups, ["a.dfly"])

    def test_ipv4_is_preferred_when_a_name_has_both(self) -> None:
        self.dns.answers["localhost"] = [IPv6Address("TCP", "::1", 0), v4("127.0.0.1")]
        self.assertEqual(self.expand(("localhost", 8002)), (("127.0.0.1", 8002),))
        self.dns.answers["v6.dfly"] = [IPv6Address("TCP", "fd00::1", 0)]
        self.assertEqual(self.expand(("v6.dfly", 8002)), (("fd00::1", 8002),))

    def test_the_answer_is_kept_for_30_seconds_then_looked_up_again(self) -> None:
        """Supernodes added behind the name are used from the next lookup on."""
        self.dns.answers["sn.dfly"] = [v4("10.0.0.5")]
        self.expand(("sn.dfly", 8002))
        self.dns.answers["sn.dfly"] = [v4("10.0.0.5"), v4("10.0.0.9")]
        self.reactor.advance(RESOLVE_EVERY - 1)
        self.assertEqual(self.expand(("sn.dfly", 8002)), (("10.0.0.5", 8002),))
        self.reactor.advance(1)
        self.assertEqual(self.expand(("sn.dfly", 8002)), (("10.0.0.5", 8002), ("10.0.0.9", 8002)))
        self.assertEqual(self.dns.lookups, ["sn.dfly", "sn.dfly"])

    def test_a_failed_lookup_keeps_the_last_answer(self) -> None:
        """A DNS blip must not empty the node list."""
        self.dns.answers["sn.dfly"] = [v4("10.0.0.5"), v4("10.0.0.6")]
        self.expand(("sn.dfly", 8002))
        self.dns.answers["sn.dfly"] = []
        self.reactor.advance(RESOLVE_EVERY)
        self.assertEqual(self.expand(("sn.dfly", 8002)), (("10.0.0.5", 8002), ("10.0.0.6", 8002)))

    def test_a_name_never_resolved_stays_as_given(self) -> None:
        """The connection to it then says why it fails; the other nodes are used."""
        self.dns.answers["b.dfly"] = [v4("10.0.0.2")]
        self.assertEqual(self.expand(("nowhere.invalid", 8002), ("b.dfly", 8002)),
                         (("nowhere.invalid", 8002), ("10.0.0.2", 8002)))

    def test_a_hung_lookup_gives_up_after_the_timeout(self) -> None:
        self.dns.answers["slow.dfly"] = None
        d = Deferred.fromCoroutine(self.names.expand((("slow.dfly", 8002),)))
        self.assertNoResult(d)
        self.reactor.advance(3.0)
        self.assertEqual(self.successResultOf(d), (("slow.dfly", 8002),))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_concurrent_downloads_share_one_lookup(self) -> None:
        self.dns.answers["slow.dfly"] = None
        first = Deferred.fromCoroutine(self.names.expand((("slow.dfly", 8002),)))
        second = Deferred.fromCoroutine(self.names.expand((("slow.dfly", 9002),)))
        self.assertEqual(self.dns.lookups, ["slow.dfly"])
        first.cancel()
        self.failureResultOf(first)
        self.reactor.advance(3.0)
        self.assertEqual(self.successResultOf(second), (("slow.dfly", 9002),))
