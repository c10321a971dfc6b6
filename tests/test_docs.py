"""README.rst and docs/*.rst parse cleanly as reStructuredText.

docutils quietly renders a malformed table or a broken reference as an error
box in the middle of the page; nobody notices until a reader does.  Each file
gets its own test, so a failure names the file, and the failure lists every
problem docutils reported at WARNING or above, with its line.
"""

import io
import os
from typing import List

import docutils.core
import docutils.nodes
import docutils.utils
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def rst_problems(path: str) -> List[str]:
    """
    Parse C{path} with docutils and return one C{"line N: LEVEL: message"}
    string per system message at WARNING (level 2) or above.

    C{report_level} 5 keeps docutils from printing to stderr, C{halt_level} 5
    from raising on the first error; the messages stay in the doctree, where
    each carries its level and (for most) its line.
    """
    with open(path, encoding="utf-8") as f:
        source = f.read()
    document = docutils.core.publish_doctree(
        source,
        source_path=path,
        settings_overrides={
            "report_level": 5,
            "halt_level": 5,
            "warning_stream": io.StringIO(),
            # Docs must not pull in other files or run anything to render.
            "file_insertion_enabled": False,
            "raw_enabled": False,
        },
    )
    problems = []
    for message in document.findall(docutils.nodes.system_message):
        level = message["level"]
        if level < docutils.utils.Reporter.WARNING_LEVEL:
            continue
        # The first child is the message text; later ones echo the source.
        text = message.children[0].astext() if message.children else message.astext()
        text = " ".join(text.split())
        line = message.get("line", "?")
        problems.append(
            f"line {line}: {docutils.utils.Reporter.levels[level]}: {text}"
        )
    return problems


class RstParsesCleanly:
    """
    Mixin: C{path} (relative to the repository) parses with no docutils
    message at WARNING or above.
    """

    path: str

    def test_parses_without_warnings(self) -> None:
        """The file has no reStructuredText warning or error."""
        problems = rst_problems(os.path.join(ROOT, self.path))
        if problems:
            self.fail(  # type: ignore[attr-defined]
                f"{self.path}: {len(problems)} problem(s):\n" + "\n".join(problems)
            )


def _test_case_for(path: str) -> type:
    name = os.path.splitext(os.path.basename(path))[0].capitalize() + "RstTests"
    return type(
        name,
        (RstParsesCleanly, SynchronousTestCase),
        {"path": path, "__doc__": f"{path} is valid reStructuredText."},
    )


_RST_FILES = ["README.rst"] + sorted(
    os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".rst")
)

for _path in _RST_FILES:
    _case = _test_case_for(_path)
    globals()[_case.__name__] = _case
del _path, _case


class RstProblemsTests(SynchronousTestCase):
    """rst_problems itself reports what it should."""

    def _problems_of(self, text: str) -> List[str]:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return rst_problems(path)

    def test_malformed_table_is_reported_with_its_line(self) -> None:
        """Text in a simple table's column margin is an error naming the offending line."""
        problems = self._problems_of(
            "Title\n=====\n\n"
            "=====  =====\n"
            "a      b\n"
            "=====  =====\n"
            "``toolong``  x\n"
            "=====  =====\n"
        )
        self.assertEqual(
            problems,
            ["line 7: ERROR: Malformed table. Text in column margin in table line 4."],
        )

    def test_clean_file_has_no_problems(self) -> None:
        """A well-formed file gives an empty list."""
        self.assertEqual(self._problems_of("Title\n=====\n\nSome *text*.\n"), [])

    def test_info_messages_are_ignored(self) -> None:
        """Messages below WARNING (here an INFO about a duplicate implicit target) do not count."""
        problems = self._problems_of("A\n=\n\nB\n-\n\nB\n-\n")
        self.assertEqual(problems, [])
