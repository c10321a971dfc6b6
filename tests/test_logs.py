"""Tests for dfly.logs: the Dragonfly line format and its observers."""

from __future__ import annotations

import io
import re
from datetime import datetime
from typing import Any

from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dfly.logs import (
    CLIENT_NAMESPACE,
    format_line,
    is_client_event,
    is_dfly_event,
    line_observer,
    make_sign,
)

#: A time with an exactly representable fraction, so milliseconds are exact.
STAMP = 1550042445.5


def event(fmt: str = "hello {who}", level: LogLevel = LogLevel.info, **fields: Any) -> LogEvent:
    """A hand-built twisted.logger event."""
    e: LogEvent = {
        "log_format": fmt,
        "log_level": level,
        "log_time": STAMP,
        "log_namespace": "dfly.test",
        "who": "world",
    }
    e.update(fields)
    return e


def local_stamp(seconds: float) -> str:
    """The expected 'YYYY-MM-DD HH:MM:SS' in local time, computed independently."""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


class MakeSignTests(SynchronousTestCase):
    def test_pid_and_seconds(self) -> None:
        """The sign is '<pid>-<seconds>' with three decimals."""
        self.assertEqual(make_sign(31923, 1550042443.708), "31923-1550042443.708")

    def test_whole_seconds_get_three_decimals(self) -> None:
        """Whole seconds are padded to three decimals."""
        self.assertEqual(make_sign(7, 1550042443), "7-1550042443.000")


class FormatLineTests(SynchronousTestCase):
    def test_full_line(self) -> None:
        """A line is 'date time.mmm LEVL sign:<sign> : message' and a newline."""
        line = format_line(event(), "1-2.000")
        self.assertEqual(line, f"{local_stamp(STAMP)}.500 INFO sign:1-2.000 : hello world\n")

    def test_milliseconds_are_zero_padded(self) -> None:
        """31.25 ms past the second is written '.031', truncated and padded."""
        line = format_line(event(log_time=1550042445.03125), None)
        assert line is not None
        self.assertTrue(line.startswith(f"{local_stamp(1550042445)}.031 "), line)

    def test_warn_level(self) -> None:
        """warn is written WARN."""
        line = format_line(event(level=LogLevel.warn), None)
        assert line is not None
        self.assertEqual(line.split(" ")[2], "WARN")

    def test_error_level(self) -> None:
        """error is written ERRO."""
        line = format_line(event(level=LogLevel.error), None)
        assert line is not None
        self.assertEqual(line.split(" ")[2], "ERRO")

    def test_debug_level(self) -> None:
        """debug is written DEBU."""
        line = format_line(event(level=LogLevel.debug), None)
        assert line is not None
        self.assertEqual(line.split(" ")[2], "DEBU")

    def test_event_sign_overrides_default(self) -> None:
        """An event's own sign (a dfget run served by the daemon) wins."""
        line = format_line(event(sign="99-1.000"), "1-2.000")
        assert line is not None
        self.assertIn(" sign:99-1.000 : ", line)
        self.assertNotIn("1-2.000", line)

    def test_no_sign_omits_the_field(self) -> None:
        """Without any sign the line has no 'sign:' field."""
        line = format_line(event(), None)
        self.assertEqual(line, f"{local_stamp(STAMP)}.500 INFO : hello world\n")

    def test_failure_appends_traceback(self) -> None:
        """A logged failure's traceback follows the message."""
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            failure = Failure()
        line = format_line(event("it broke", log_failure=failure), None)
        assert line is not None
        first, rest = line.split("\n", 1)
        self.assertTrue(first.endswith(" : it broke"), first)
        self.assertIn("Traceback", rest)
        self.assertIn("ZeroDivisionError", rest)
        self.assertTrue(line.endswith("\n"))

    def test_empty_event_gives_no_line(self) -> None:
        """An event with nothing to say produces no line."""
        self.assertIsNone(format_line(event(""), "1-2.000"))

    def test_line_shape(self) -> None:
        """The line matches Dragonfly's format, so existing greps keep working."""
        line = format_line(event(), "31923-1550042443.708")
        assert line is not None
        self.assertRegex(
            line,
            r"\A\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO sign:31923-1550042443\.708 : hello world\n\Z",
        )


class LineObserverTests(SynchronousTestCase):
    def test_writes_lines(self) -> None:
        """The observer writes each event as one formatted line."""
        out = io.StringIO()
        observer = line_observer(out, "1-2.000")
        observer(event(who="a"))
        observer(event(who="b"))
        self.assertEqual(
            [re.sub(r"^.* : ", "", line) for line in out.getvalue().splitlines()],
            ["hello a", "hello b"],
        )

    def test_accept_filters_events(self) -> None:
        """Only events the predicate accepts are written."""
        out = io.StringIO()
        observer = line_observer(out, None, accept=lambda e: e["who"] == "yes")
        observer(event(who="no"))
        observer(event(who="yes"))
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertIn("hello yes", out.getvalue())

    def test_empty_event_writes_nothing(self) -> None:
        """An event with no text adds nothing to the file."""
        out = io.StringIO()
        line_observer(out, None)(event(""))
        self.assertEqual(out.getvalue(), "")


class NamespaceTests(SynchronousTestCase):
    def test_client_namespace_is_client_event(self) -> None:
        """Events in dfly.client go to dfclient.log."""
        self.assertTrue(is_client_event(event(log_namespace=CLIENT_NAMESPACE)))

    def test_client_sub_namespace_is_client_event(self) -> None:
        """A child namespace of dfly.client is a client event too."""
        self.assertTrue(is_client_event(event(log_namespace=CLIENT_NAMESPACE + ".engine")))

    def test_other_dfly_namespace_is_not_client_event(self) -> None:
        """dfly.supernode is not a client event."""
        self.assertFalse(is_client_event(event(log_namespace="dfly.supernode.tasks")))

    def test_missing_namespace_is_not_client_event(self) -> None:
        """An event without a namespace is not a client event."""
        e = event()
        del e["log_namespace"]
        self.assertFalse(is_client_event(e))

    def test_dfly_namespace_is_dfly_event(self) -> None:
        """Our own modules' events are dfly events."""
        self.assertTrue(is_dfly_event(event(log_namespace="dfly.peer.engine")))

    def test_library_namespace_is_not_dfly_event(self) -> None:
        """Twisted's chatter is not a dfly event."""
        self.assertFalse(is_dfly_event(event(log_namespace="twisted.web.client")))
