"""Tests for dfly.pieces: piece arithmetic, task identity and digests."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dfly.pieces import (
    DEFAULT_PIECE_SIZE,
    MAX_PIECE_SIZE,
    GiB,
    MiB,
    format_range,
    is_md5,
    parse_digest,
    parse_filter,
    parse_range,
    piece_count,
    piece_num_of,
    piece_range,
    piece_size_for,
    task_id,
    task_url,
)

MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

lengths = st.integers(min_value=0, max_value=4 * GiB)
piece_sizes = st.integers(min_value=1, max_value=16 * MiB)


class PieceSizeForTests(SynchronousTestCase):
    def test_unknown_length_gets_default_size(self) -> None:
        """A file of unknown length (-1) uses 4 MiB pieces."""
        self.assertEqual(piece_size_for(-1), 4 * MiB)

    def test_empty_file_gets_default_size(self) -> None:
        """An empty file uses 4 MiB pieces."""
        self.assertEqual(piece_size_for(0), 4 * MiB)

    def test_200_mib_gets_default_size(self) -> None:
        """Exactly 200 MiB is still a small file with 4 MiB pieces."""
        self.assertEqual(piece_size_for(200 * MiB), 4 * MiB)

    def test_just_over_200_mib_gets_default_size(self) -> None:
        """Growth is per whole 100 MiB: 200 MiB + 1 byte still gets 4 MiB."""
        self.assertEqual(piece_size_for(200 * MiB + 1), 4 * MiB)

    def test_300_mib_gets_5_mib(self) -> None:
        """300 MiB is one step of 100 MiB above the limit: 5 MiB pieces."""
        self.assertEqual(piece_size_for(300 * MiB), 5 * MiB)

    def test_1_gib_gets_12_mib(self) -> None:
        """1 GiB (1024 MiB) is eight steps above the limit: 12 MiB pieces."""
        self.assertEqual(piece_size_for(1 * GiB), 12 * MiB)

    def test_1300_mib_reaches_the_cap(self) -> None:
        """1300 MiB would be 15 MiB, the maximum."""
        self.assertEqual(piece_size_for(1300 * MiB), 15 * MiB)

    def test_huge_file_is_capped_at_15_mib(self) -> None:
        """A 1 TiB file still gets 15 MiB pieces."""
        self.assertEqual(piece_size_for(1024 * GiB), 15 * MiB)

    @given(st.integers(min_value=-1, max_value=8 * GiB), st.integers(min_value=-1, max_value=8 * GiB))
    def test_piece_size_is_monotonic_in_length(self, a: int, b: int) -> None:
        """A longer file never gets smaller pieces."""
        small, large = sorted((a, b))
        self.assertLessEqual(piece_size_for(small), piece_size_for(large))

    @given(st.integers(min_value=-1, max_value=1 << 50))
    def test_piece_size_is_within_bounds(self, length: int) -> None:
        """Every piece size lies between 4 MiB and 15 MiB."""
        size = piece_size_for(length)
        self.assertTrue(DEFAULT_PIECE_SIZE <= size <= MAX_PIECE_SIZE, size)


class PieceCountTests(SynchronousTestCase):
    def test_empty_file_has_no_pieces(self) -> None:
        """Zero bytes need zero pieces."""
        self.assertEqual(piece_count(0, 4 * MiB), 0)

    def test_exact_multiple(self) -> None:
        """8 MiB in 4 MiB pieces is two pieces."""
        self.assertEqual(piece_count(8 * MiB, 4 * MiB), 2)

    def test_one_byte_over_needs_another_piece(self) -> None:
        """A trailing byte gets a piece of its own."""
        self.assertEqual(piece_count(8 * MiB + 1, 4 * MiB), 3)

    def test_unknown_length_is_rejected(self) -> None:
        """The count of a file of unknown length is an error, not a guess."""
        self.assertRaises(ValueError, piece_count, -1, 4 * MiB)


class PieceRangeTests(SynchronousTestCase):
    def test_first_piece(self) -> None:
        """Piece 0 covers the first piece_size bytes, inclusive end."""
        self.assertEqual(piece_range(0, 100, 250), (0, 99))

    def test_short_last_piece(self) -> None:
        """The last piece ends at the last byte of the file."""
        self.assertEqual(piece_range(2, 100, 250), (200, 249))

    def test_range_past_end_is_rejected(self) -> None:
        """A piece starting at or after the end of the file does not exist."""
        self.assertRaises(ValueError, piece_range, 3, 100, 250)

    def test_negative_piece_is_rejected(self) -> None:
        """Piece -1 does not exist."""
        self.assertRaises(ValueError, piece_range, -1, 100, 250)

    def test_empty_file_has_no_piece_zero(self) -> None:
        """An empty file has no piece at all."""
        self.assertRaises(ValueError, piece_range, 0, 100, 0)

    @settings(max_examples=200)
    @given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=1_000))
    def test_pieces_tile_the_file(self, length: int, piece_size: int) -> None:
        """Pieces cover [0, length) in order, no gap or overlap, all full but the last."""
        count = piece_count(length, piece_size)
        ranges = [piece_range(n, piece_size, length) for n in range(count)]
        position = 0
        for n, (start, end) in enumerate(ranges):
            self.assertEqual(start, position)
            self.assertLessEqual(start, end)
            if n < count - 1:
                self.assertEqual(end - start + 1, piece_size)
            else:
                self.assertLessEqual(end - start + 1, piece_size)
            position = end + 1
        self.assertEqual(position, length)

    @given(lengths, piece_sizes, st.data())
    def test_pieces_tile_large_files(self, length: int, piece_size: int, data: st.DataObject) -> None:
        """For realistic sizes each piece is full and abuts the next, the last ends at length - 1."""
        count = piece_count(length, piece_size)
        if count == 0:
            self.assertEqual(length, 0)
            return
        self.assertEqual(piece_range(0, piece_size, length)[0], 0)
        n = data.draw(st.integers(min_value=0, max_value=count - 1), label="piece")
        start, end = piece_range(n, piece_size, length)
        if n < count - 1:
            self.assertEqual(end - start + 1, piece_size)
            self.assertEqual(piece_range(n + 1, piece_size, length)[0], end + 1)
        else:
            self.assertEqual(end, length - 1)
            self.assertTrue(0 < end - start + 1 <= piece_size)
            self.assertRaises(ValueError, piece_range, n + 1, piece_size, length)

    @given(lengths, piece_sizes, st.data())
    def test_piece_num_of_inverts_piece_range(self, length: int, piece_size: int, data: st.DataObject) -> None:
        """The range of piece n maps back to n."""
        count = piece_count(length, piece_size)
        if count == 0:
            return
        n = data.draw(st.integers(min_value=0, max_value=count - 1))
        self.assertEqual(piece_num_of(piece_range(n, piece_size, length), piece_size), n)


class ParseRangeTests(SynchronousTestCase):
    def test_parses_start_and_end(self) -> None:
        """'0-99' is bytes 0 to 99 inclusive."""
        self.assertEqual(parse_range("0-99"), (0, 99))

    def test_single_byte_range(self) -> None:
        """A range may hold one byte."""
        self.assertEqual(parse_range("5-5"), (5, 5))

    def test_surrounding_whitespace_is_ignored(self) -> None:
        """Spaces around the range are stripped."""
        self.assertEqual(parse_range(" 10-20 "), (10, 20))

    def test_end_before_start_is_rejected(self) -> None:
        """'20-10' is not a range."""
        self.assertRaises(ValueError, parse_range, "20-10")

    def test_open_ended_range_is_rejected(self) -> None:
        """Both ends must be given: '100-' is rejected."""
        self.assertRaises(ValueError, parse_range, "100-")

    def test_suffix_range_is_rejected(self) -> None:
        """HTTP suffix ranges ('-100') are not piece ranges."""
        self.assertRaises(ValueError, parse_range, "-100")

    def test_bytes_prefix_is_rejected(self) -> None:
        """The piece API takes 'start-end', not a Range header value."""
        self.assertRaises(ValueError, parse_range, "bytes=0-99")

    def test_negative_numbers_are_rejected(self) -> None:
        """'-5-10' is rejected."""
        self.assertRaises(ValueError, parse_range, "-5-10")

    def test_overlong_number_is_rejected(self) -> None:
        """Numbers are capped at 19 digits, so absurd values fail fast."""
        self.assertRaises(ValueError, parse_range, "0-" + "9" * 20)

    def test_error_message_names_the_text(self) -> None:
        """The error quotes what was given."""
        error = self.assertRaises(ValueError, parse_range, "nonsense")
        self.assertIn("'nonsense'", str(error))

    @given(st.integers(min_value=0, max_value=(1 << 62)), st.integers(min_value=0, max_value=(1 << 62)))
    def test_format_then_parse_round_trips(self, a: int, b: int) -> None:
        """parse_range(format_range(s, e)) == (s, e)."""
        start, end = sorted((a, b))
        self.assertEqual(parse_range(format_range(start, end)), (start, end))


class PieceNumOfTests(SynchronousTestCase):
    def test_full_piece(self) -> None:
        """The second full piece is piece 1."""
        self.assertEqual(piece_num_of((100, 199), 100), 1)

    def test_short_last_piece(self) -> None:
        """A short range on a boundary is the last piece."""
        self.assertEqual(piece_num_of((200, 249), 100), 2)

    def test_misaligned_start_is_rejected(self) -> None:
        """A range not starting on a piece boundary is not a piece."""
        self.assertRaises(ValueError, piece_num_of, (150, 199), 100)

    def test_range_longer_than_a_piece_is_rejected(self) -> None:
        """A range spanning two pieces is not a piece."""
        self.assertRaises(ValueError, piece_num_of, (0, 100), 100)


class ParseFilterTests(SynchronousTestCase):
    def test_none_is_empty(self) -> None:
        """No filter drops no keys."""
        self.assertEqual(parse_filter(None), ())

    def test_empty_string_is_empty(self) -> None:
        """An empty filter drops no keys."""
        self.assertEqual(parse_filter(""), ())

    def test_ampersand_separated_keys(self) -> None:
        """'k1&k2' names two keys, sorted."""
        self.assertEqual(parse_filter("sig&expires"), ("expires", "sig"))

    def test_list_of_keys(self) -> None:
        """A list of keys is accepted as is."""
        self.assertEqual(parse_filter(["b", "a"]), ("a", "b"))

    def test_blank_and_duplicate_keys_are_dropped(self) -> None:
        """Empty parts, whitespace and repeats do not produce keys."""
        self.assertEqual(parse_filter(" a && a & b "), ("a", "b"))


class TaskUrlTests(SynchronousTestCase):
    def test_no_filter_returns_url_unchanged(self) -> None:
        """Without filter keys the URL is returned exactly as given."""
        url = "http://example.com/f?b=2&a=1"
        self.assertEqual(task_url(url), url)

    def test_filter_keys_are_removed(self) -> None:
        """The named query keys are gone from the task URL."""
        result = task_url("http://example.com/f?sig=abc&expires=99", ["sig", "expires"])
        self.assertEqual(result, "http://example.com/f")

    def test_other_keys_are_kept_in_order(self) -> None:
        """Keys not named by the filter stay, in their order."""
        result = task_url("http://example.com/f?b=2&sig=abc&a=1", ["sig"])
        self.assertEqual(result, "http://example.com/f?b=2&a=1")

    def test_repeated_filter_key_is_removed_everywhere(self) -> None:
        """Every occurrence of a filtered key is dropped."""
        result = task_url("http://example.com/f?sig=1&x=y&sig=2", ["sig"])
        self.assertEqual(result, "http://example.com/f?x=y")

    def test_scheme_host_and_path_are_kept(self) -> None:
        """Only the query changes."""
        result = task_url("https://cdn.example.com:8443/a/b.iso?sig=1", ["sig"])
        self.assertEqual(result, "https://cdn.example.com:8443/a/b.iso")


class TaskIdTests(SynchronousTestCase):
    def test_is_64_hex_digits(self) -> None:
        """A task id is a hex sha256."""
        self.assertRegex(task_id("http://example.com/f"), r"\A[0-9a-f]{64}\Z")

    def test_matches_documented_formula(self) -> None:
        """The id is sha256(url NUL md5), as both sides must compute it."""
        expected = hashlib.sha256(f"http://example.com/f\0{MD5}".encode()).hexdigest()
        self.assertEqual(task_id("http://example.com/f", md5=MD5), expected)

    def test_same_url_and_md5_give_same_id(self) -> None:
        """Identical inputs give identical ids."""
        self.assertEqual(task_id("http://example.com/f", MD5), task_id("http://example.com/f", MD5))

    def test_different_urls_give_different_ids(self) -> None:
        """Different URLs are different tasks."""
        self.assertNotEqual(task_id("http://example.com/a"), task_id("http://example.com/b"))

    def test_md5_changes_the_id(self) -> None:
        """The same URL with and without an md5 are different tasks."""
        self.assertNotEqual(task_id("http://example.com/f", MD5), task_id("http://example.com/f"))

    def test_identifier_changes_the_id(self) -> None:
        """An identifier distinguishes tasks when there is no md5."""
        self.assertNotEqual(
            task_id("http://example.com/f", identifier="v1"),
            task_id("http://example.com/f", identifier="v2"),
        )

    def test_md5_takes_precedence_over_identifier(self) -> None:
        """When both are given, only the md5 counts."""
        self.assertEqual(
            task_id("http://example.com/f", md5=MD5, identifier="v1"),
            task_id("http://example.com/f", md5=MD5),
        )

    def test_filter_makes_signed_urls_one_task(self) -> None:
        """Two signatures of the same object give one id once filtered."""
        keys = parse_filter("sig&expires")
        first = task_id(task_url("http://example.com/f?sig=aaa&expires=1", keys), MD5)
        second = task_id(task_url("http://example.com/f?sig=bbb&expires=2", keys), MD5)
        self.assertEqual(first, second)

    def test_unfiltered_signed_urls_are_different_tasks(self) -> None:
        """Without the filter, different signatures are different tasks."""
        first = task_id("http://example.com/f?sig=aaa", MD5)
        second = task_id("http://example.com/f?sig=bbb", MD5)
        self.assertNotEqual(first, second)


class ParseDigestTests(SynchronousTestCase):
    def test_sha256(self) -> None:
        """'sha256:<64 hex>' parses."""
        self.assertEqual(parse_digest(f"sha256:{SHA256}"), ("sha256", SHA256))

    def test_md5(self) -> None:
        """'md5:<32 hex>' parses."""
        self.assertEqual(parse_digest(f"md5:{MD5}"), ("md5", MD5))

    def test_upper_case_is_normalised(self) -> None:
        """Algorithm and hex digits come back lower case."""
        self.assertEqual(parse_digest(f"SHA256:{SHA256.upper()}"), ("sha256", SHA256))

    def test_missing_algorithm_is_rejected(self) -> None:
        """A bare hex string is not a digest."""
        self.assertRaises(ValueError, parse_digest, SHA256)

    def test_unknown_algorithm_is_rejected(self) -> None:
        """Only sha256 and md5 are accepted."""
        self.assertRaises(ValueError, parse_digest, f"sha1:{'a' * 40}")

    def test_wrong_length_for_algorithm_is_rejected(self) -> None:
        """An md5-length value labelled sha256 is rejected."""
        self.assertRaises(ValueError, parse_digest, f"sha256:{MD5}")

    def test_non_hex_value_is_rejected(self) -> None:
        """Non-hex characters are rejected."""
        self.assertRaises(ValueError, parse_digest, "md5:" + "g" * 32)


class IsMd5Tests(SynchronousTestCase):
    def test_lower_case_md5(self) -> None:
        """32 lower-case hex digits are an md5."""
        self.assertTrue(is_md5(MD5))

    def test_upper_case_md5(self) -> None:
        """Upper-case hex is accepted too."""
        self.assertTrue(is_md5(MD5.upper()))

    def test_wrong_length(self) -> None:
        """31 hex digits are not an md5."""
        self.assertFalse(is_md5(MD5[:-1]))

    def test_trailing_newline(self) -> None:
        """A trailing newline is not ignored."""
        self.assertFalse(is_md5(MD5 + "\n"))

    def test_non_hex(self) -> None:
        """Non-hex characters are rejected."""
        self.assertFalse(is_md5("z" * 32))
