"""Build ``corpus.jsonl`` for the RAG example from Python standard-library docstrings.

Each document is the opening prose of the docstring of a standard-library module, class or function, e.g.::

    {"id": "stdlib:json.loads", "title": "json.loads", "text": "Deserialize s (a str, bytes or bytearray ..."}

Only the leading prose paragraphs are kept: extraction stops at the first code sample, doctest, indented table,
section header or paragraph that introduces a list (ends with a colon). Call-signature lines that C functions put
at the top of their docstrings are dropped, light reStructuredText markup is removed, whitespace is collapsed and
the text is capped at ``MAX_CHARS``. Documents that are too short to be useful are skipped and duplicate texts are
removed (first occurrence wins).

The set of modules and members is fixed in ``SOURCES`` and emitted in that order, so the output is deterministic
for a given Python version. Docstrings differ between Python releases, which is why the generated file is
committed: the example and its tests do not depend on the interpreter that runs them.

Usage (from the repository root)::

    python examples/rag/build_corpus.py            # writes examples/rag/corpus.jsonl
    python examples/rag/build_corpus.py -o out.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "corpus.jsonl"

MAX_CHARS = 1000
"""Hard cap on the length of one document's text."""

TARGET_CHARS = 450
"""Stop adding paragraphs once the text is at least this long."""

MIN_CHARS = 20
MIN_WORDS = 3

# module -> members to document after the module itself (dotted paths are resolved attribute by attribute).
SOURCES: dict[str, tuple[str, ...]] = {
    # Data formats and serialization
    "json": ("dump", "dumps", "load", "loads", "JSONDecoder", "JSONEncoder"),
    "csv": ("reader", "writer", "DictReader", "DictWriter", "Sniffer"),
    "tomllib": ("load", "loads"),
    "configparser": ("ConfigParser",),
    "pickle": ("dumps", "loads"),
    "copy": ("copy", "deepcopy"),
    "shelve": ("open",),
    "struct": ("pack", "unpack", "calcsize"),
    "base64": ("b64encode", "b64decode", "urlsafe_b64encode"),
    "binascii": ("hexlify",),
    "codecs": ("encode", "decode"),
    "unicodedata": ("normalize", "lookup"),
    "xml.etree.ElementTree": ("parse", "fromstring", "tostring", "iterparse"),
    "html": ("escape", "unescape"),
    "html.parser": ("HTMLParser",),
    # Compression and archives
    "gzip": ("open", "compress", "decompress", "GzipFile"),
    "zlib": ("compress", "decompress", "crc32"),
    "bz2": ("open", "compress"),
    "lzma": ("open", "compress"),
    "zipfile": ("ZipFile", "is_zipfile"),
    "tarfile": ("open", "is_tarfile"),
    # Text processing
    "re": ("match", "search", "fullmatch", "sub", "split", "findall", "compile", "escape"),
    "fnmatch": ("fnmatch", "filter"),
    "string": ("Template", "capwords"),
    "textwrap": ("wrap", "fill", "dedent", "shorten"),
    "difflib": ("SequenceMatcher", "unified_diff", "get_close_matches"),
    "shlex": ("split", "quote"),
    "pprint": ("pprint", "pformat"),
    # Databases
    "sqlite3": ("connect", "Connection", "Cursor", "complete_statement"),
    "dbm": ("open",),
    # Dates and times
    "datetime": ("datetime", "timedelta", "timezone"),
    "time": ("time", "sleep", "monotonic", "perf_counter", "strftime", "strptime"),
    "calendar": ("isleap", "monthrange"),
    # Data structures and algorithms
    "heapq": ("heappush", "heappop", "heapify", "nlargest", "nsmallest", "merge"),
    "bisect": ("bisect_left", "insort"),
    "collections": ("namedtuple", "deque", "Counter", "OrderedDict", "defaultdict", "ChainMap"),
    "array": ("array",),
    "graphlib": ("TopologicalSorter",),
    "itertools": ("chain", "groupby", "permutations", "combinations", "product", "islice", "accumulate"),
    "functools": ("lru_cache", "cache", "partial", "reduce", "wraps", "singledispatch"),
    "operator": ("itemgetter", "attrgetter"),
    "enum": ("Enum", "IntEnum", "auto"),
    "dataclasses": ("dataclass", "field", "asdict"),
    "weakref": ("WeakValueDictionary", "finalize"),
    # Numbers and math
    "math": ("sqrt", "gcd", "isclose", "factorial", "comb", "log", "dist"),
    "decimal": ("Decimal",),
    "fractions": ("Fraction",),
    "random": ("randint", "choice", "shuffle", "sample", "seed"),
    "statistics": ("mean", "median", "stdev", "quantiles", "correlation", "linear_regression"),
    # Cryptography and identifiers
    "hashlib": ("sha256", "md5", "new", "pbkdf2_hmac", "blake2b", "file_digest"),
    "hmac": ("new", "compare_digest"),
    "secrets": ("token_bytes", "token_hex", "token_urlsafe"),
    "uuid": ("uuid1", "uuid4", "UUID"),
    # Files and operating system
    "os": ("getcwd", "listdir", "makedirs", "remove", "walk", "getenv", "cpu_count", "urandom"),
    "os.path": ("join", "exists", "splitext", "basename", "getsize"),
    "pathlib": ("Path", "PurePath"),
    "shutil": ("copyfile", "copytree", "rmtree", "move", "make_archive", "which", "disk_usage"),
    "glob": ("glob", "iglob"),
    "tempfile": ("TemporaryDirectory", "NamedTemporaryFile", "mkstemp"),
    "io": ("StringIO", "BytesIO", "TextIOWrapper"),
    "mimetypes": ("guess_type",),
    "platform": ("system", "python_version"),
    "sys": ("exit", "getsizeof"),
    "signal": ("signal",),
    # Processes, threads and concurrency
    "subprocess": ("run", "Popen", "check_output", "CalledProcessError"),
    "threading": ("Thread", "Lock", "RLock", "Event", "Condition", "Semaphore"),
    "queue": ("Queue", "PriorityQueue", "LifoQueue"),
    "multiprocessing": ("Pool", "Process"),
    "concurrent.futures": ("ThreadPoolExecutor", "ProcessPoolExecutor", "as_completed", "Future"),
    "asyncio": (
        "run",
        "gather",
        "sleep",
        "wait_for",
        "create_task",
        "Queue",
        "Lock",
        "open_connection",
        "start_server",
        "to_thread",
    ),
    "contextvars": ("ContextVar",),
    # Networking and the web
    "socket": ("socket", "create_connection", "create_server", "getaddrinfo"),
    "selectors": ("DefaultSelector", "BaseSelector"),
    "select": ("select",),
    "ssl": ("create_default_context", "SSLContext"),
    "ipaddress": ("ip_address", "ip_network"),
    "urllib.parse": ("urlparse", "urlencode", "quote", "parse_qs", "urljoin"),
    "urllib.request": ("urlopen", "urlretrieve"),
    "http.server": ("HTTPServer", "SimpleHTTPRequestHandler", "BaseHTTPRequestHandler"),
    "email.message": ("EmailMessage",),
    "smtplib": ("SMTP",),
    # Logging, debugging and development tools
    "logging": ("getLogger", "basicConfig", "Logger", "FileHandler", "Formatter"),
    "logging.handlers": ("RotatingFileHandler",),
    "warnings": ("warn", "filterwarnings", "catch_warnings"),
    "traceback": ("print_exc", "format_exc"),
    "argparse": ("ArgumentParser",),
    "contextlib": ("contextmanager", "suppress", "closing", "ExitStack", "redirect_stdout"),
    "abc": ("ABC", "abstractmethod"),
    "typing": ("NamedTuple", "TypedDict", "cast"),
    "inspect": ("signature", "getsource", "getmembers"),
    "importlib": ("import_module", "reload"),
    "ast": ("parse", "literal_eval"),
    "timeit": ("timeit", "Timer"),
    "cProfile": ("Profile",),
    "unittest": ("TestCase",),
    "unittest.mock": ("Mock", "MagicMock", "patch"),
    "doctest": (),
    "venv": ("create",),
}

# Objects whose docstrings are placeholders, notes to maintainers or inherited from an unrelated builtin.
SKIP: frozenset[str] = frozenset({"http.client", "http.cookies", "wave"})

_SIGNATURE_RE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(?:-+>.*)?$", re.DOTALL)
_UNDERLINE_RE = re.compile(r"^\s*([-=~^*])\1{2,}\s*$")
_BOILERPLATE_RE = re.compile(r"copyright|all rights reserved|written by|\(c\)|^xxx\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ROLE_RE = re.compile(r":[\w:]+:`~?([^`]+)`")
_LITERAL_RE = re.compile(r"``([^`]+)``")
_INTERPRETED_RE = re.compile(r"`([^`]+)`")
_LINK_RE = re.compile(r"\s*<https?://[^>]+>|\s*https?://\S+")
_TABLE_RULE_RE = re.compile(r"^[-=~^*]{3,}(?:\s+[-=~^*]{3,})+$")
_LISTING_RE = re.compile(r"^[\w.]+(?:\(.*\))?\s+-->?\s")  # "name -- description" / "f(x) --> result"
_PARAM_RE = re.compile(r"^'?[a-z_]\w*'?:\s")  # "mode: ..." parameter descriptions


def own_docstring(obj: Any) -> str | None:
    """Return the docstring that ``obj`` itself defines.

    Classes do not inherit a docstring from their bases here; a class without one falls back to the docstring of
    its own ``__init__`` (if it defines one), which is where some classes document themselves.
    """
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
        init = vars(obj).get("__init__")
        if not doc and inspect.isfunction(init):
            doc = init.__doc__
    else:
        doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _strip_markup(text: str) -> str:
    text = _LINK_RE.sub("", text)
    text = _ROLE_RE.sub(r"\1", text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _INTERPRETED_RE.sub(r"\1", text)
    return " ".join(text.split())


def _cap(text: str, limit: int = MAX_CHARS) -> str:
    """Shorten ``text`` to at most ``limit`` characters, preferring to cut at the end of a sentence."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if cut >= limit // 3:
        return head[: cut + 1]
    cut = head.rfind(" ")
    return head[:cut].rstrip(",;:") + "..."


def _drop_titles(lines: list[str]) -> list[str]:
    """Remove reStructuredText section titles (a line followed by an underline such as ``~~~``)."""
    out: list[str] = []
    for line in lines:
        if _UNDERLINE_RE.match(line):
            if out:
                out.pop()
            continue
        out.append(line)
    return out


def _until_listing(lines: list[str], *, skip_first: bool) -> list[str]:
    """Cut a paragraph before a line that starts a listing or a code sample.

    Listings are "Arguments:" followed by more lines, "mode: ..." parameter descriptions and "name -- description"
    entries; code samples are recognised by comment lines. With ``skip_first`` the first line is exempt from the
    "name -- description" check, because that is how some modules introduce themselves ("codecs -- Python Codec
    Registry, API and helpers.").
    """
    for i, line in enumerate(lines):
        stripped = line.strip()
        if (
            (stripped.endswith(":") and i + 1 < len(lines))
            or _PARAM_RE.match(stripped)
            or stripped.startswith("#")
            or (_LISTING_RE.match(stripped) and not (skip_first and i == 0))
        ):
            return lines[:i]
    return lines


def _until_boilerplate(paragraph: str) -> tuple[str, bool]:
    """Cut ``paragraph`` before the first sentence with copyright/authorship boilerplate; report whether it did."""
    sentences = _SENTENCE_END_RE.split(paragraph)
    for i, sentence in enumerate(sentences):
        if _BOILERPLATE_RE.search(sentence):
            return " ".join(sentences[:i]), True
    return paragraph, False


def extract_text(doc: str) -> str:
    """Return the leading prose of a docstring, cleaned up and capped (``""`` if there is none)."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    kept: list[str] = []
    for raw in paragraphs:
        lines = _drop_titles(raw.rstrip().lstrip("\n").splitlines())
        if not lines:
            continue  # nothing but a section title
        if not kept and len(lines) > 1 and _SIGNATURE_RE.match(lines[0].strip()):
            # "log(x, [base=math.e])" on a line of its own before the description, possibly with a remark
            lines = lines[2:] if lines[1].startswith("(") and lines[1].endswith(")") else lines[1:]
            if not lines:
                continue
        lines = _until_listing(lines, skip_first=not kept)
        if not lines:
            break
        block = "\n".join(lines)
        if _SIGNATURE_RE.match(block.strip()):
            continue  # "name(args) -> result" lines that C functions put first
        if (
            any(line[:1].isspace() for line in lines)  # indented: code block, table or aligned listing
            or ">>>" in block
            or lines[0].lstrip().startswith(("-", "*", "+", "%"))  # bullet list or format-code table
            or any(_TABLE_RULE_RE.match(line) for line in lines)
        ):
            break
        if kept and len(block.split()) < 4:
            continue  # a stray word such as "Use" or "Usage." that leads into an example
        paragraph, boilerplate = _until_boilerplate(_strip_markup(block))
        introduces_block = paragraph.endswith(":")
        if introduces_block:
            # The paragraph introduces a code sample or a list that we do not keep: drop its last sentence, unless
            # that sentence is all there is.
            sentences = _SENTENCE_END_RE.split(paragraph)
            paragraph = " ".join(sentences[:-1]) if len(sentences) > 1 or kept else paragraph[:-1].rstrip() + "."
        if paragraph:
            if kept and len(" ".join([*kept, paragraph])) > MAX_CHARS:
                break
            if kept and not kept[-1].endswith((".", "!", "?")):
                kept[-1] += "."  # keep the summary line a sentence of its own when paragraphs are joined
            kept.append(paragraph)
        if boilerplate or introduces_block or len(" ".join(kept)) >= TARGET_CHARS:
            break
    return _cap(" ".join(kept))


def _is_trivial(text: str) -> bool:
    return len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS


def _resolve(module: Any, path: str) -> Any:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def iter_documents(sources: dict[str, tuple[str, ...]] = SOURCES) -> Iterator[dict[str, str]]:
    """Yield corpus documents in ``sources`` order, skipping trivial and duplicate texts."""
    seen_texts: set[str] = set()
    seen_ids: set[str] = set()
    for module_name, members in sources.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(module_name)
        targets: list[tuple[str, Any]] = [(module_name, module)]
        for member in members:
            try:
                targets.append((f"{module_name}.{member}", _resolve(module, member)))
            except AttributeError:
                print(f"skipping {module_name}.{member}: not available in this Python", file=sys.stderr)
        for name, obj in targets:
            if name in SKIP:
                continue
            doc = own_docstring(obj)
            text = extract_text(doc) if doc else ""
            key = text.casefold()
            doc_id = f"stdlib:{name}"
            if _is_trivial(text) or key in seen_texts or doc_id in seen_ids:
                continue
            seen_texts.add(key)
            seen_ids.add(doc_id)
            yield {"id": doc_id, "title": name, "text": text}


def write_corpus(path: Path, documents: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for document in documents:
            f.write(json.dumps(document, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSONL corpus")
    args = parser.parse_args(argv)
    documents = list(iter_documents())
    write_corpus(args.output, documents)
    modules = len({d["title"] for d in documents if d["title"] in SOURCES})
    print(
        f"wrote {len(documents)} documents ({modules} module docs) to {args.output} "
        f"with Python {sys.version.split()[0]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
