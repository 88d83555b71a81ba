"""The documentation cannot rot: its Python examples run, and the site builds strictly and offline.

(a) Every fenced ```python block in ``docs/**/*.md`` is executed. The blocks of
    a page run in order, in one subprocess per *run* and one temporary working
    directory per page, so a later block sees the names and files an earlier
    one made. An HTML comment on the line right above a fence marks the block:

    * ``<!-- docs-test: new-process -->`` starts a fresh Python process (the
      tutorials load an exported model "in a fresh process" for real);
    * ``<!-- docs-test: keras -->`` makes it a Keras block: it runs with
      ``KERAS_BACKEND`` from the environment (default ``tensorflow``) and only
      when ``MATTA_DOCS_KERAS=1``; then *only* Keras blocks run (the Keras test
      target sets it, once per engine). Without it the Keras blocks are still
      parsed and compiled, so a syntax error fails here too.

    Words combine: ``<!-- docs-test: keras new-process -->``. There is no skip
    marker: a block that cannot run does not belong in the docs.

(b) ``mkdocs build --strict`` succeeds into a temporary folder, and the built
    HTML loads no script, stylesheet or font from the network.

Failures point at the Markdown: tracebacks name ``docs/<page>.md`` with the
page's own line numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
KERAS_MODE = os.environ.get("MATTA_DOCS_KERAS", "") == "1"
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<words>[\w\s-]*?)\s*-->\s*$")
MARKER_WORDS = {"keras", "new-process"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<attrs>.*)$")
RUN_TIMEOUT_S = 300


@dataclass
class Block:
    """One fenced Python block: where it is, its code and its markers."""

    page: str  # relative to the repository root, e.g. "docs/spec.md"
    line: int  # 1-based line of the first code line
    code: str
    keras: bool
    new_process: bool


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def parse(path: Path, root: Path = ROOT) -> list[Block]:
    """The Python blocks of one page, in order; raises on a malformed marker or an indented block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], m["lang"].lower()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence) and set(lines[end].strip()) == {fence[0]}):
            end += 1
        if lang in ("python", "py"):
            if m["indent"]:
                raise AssertionError(f"{page}:{i + 1}: indented python blocks are not run; put the block at column 0")
            words: set[str] = set()
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            if marker:
                words = set(marker["words"].split())
                unknown = words - MARKER_WORDS
                if unknown:
                    raise AssertionError(f"{page}:{i}: unknown docs-test marker word(s) {sorted(unknown)}")
            elif i > 0 and "docs-test" in lines[i - 1]:
                raise AssertionError(f"{page}:{i}: malformed docs-test marker {lines[i - 1]!r}")
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(page, i + 2, code, "keras" in words, "new-process" in words))
        i = end + 1
    return blocks


def runs(blocks: list[Block], keras: bool) -> list[list[Block]]:
    """The blocks of one engine grouped into processes (a new one at each ``new-process``)."""
    out: list[list[Block]] = []
    for block in blocks:
        if block.keras != keras:
            continue
        if not out or block.new_process:
            out.append([])
        out[-1].append(block)
    return out


ALL_BLOCKS = {p.relative_to(ROOT).as_posix(): parse(p) for p in pages()}
CASES = [page for page, blocks in ALL_BLOCKS.items() if runs(blocks, keras=KERAS_MODE)]

# Executes blocks in one namespace; compiled with the page's name and line numbers so that a
# traceback points at the Markdown. Module-level so the subprocess needs nothing from pytest.
RUNNER = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        source = "\\n" * (block["line"] - 1) + block["code"]
        exec(compile(source, block["page"], "exec"), namespace)
    """
)


def _env(tmp: Path, keras: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["MPLBACKEND"] = "Agg"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["KERAS_HOME"] = str(tmp / ".keras-home")
    env.setdefault("OMP_NUM_THREADS", "1")  # small models: one thread is fastest on a shared machine
    if keras:
        env.setdefault("KERAS_BACKEND", "tensorflow")
    return env


def _case_id(page: str) -> str:
    return f"{page}-keras-{os.environ.get('KERAS_BACKEND', 'tensorflow')}" if KERAS_MODE else page


@pytest.mark.subprocess
@pytest.mark.parametrize("page", CASES, ids=[_case_id(p) for p in CASES])
def test_python_blocks_run(page: str, tmp_path: Path) -> None:
    """Property (a): every Python block of ``page`` runs without error, in order."""
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path, KERAS_MODE)
    for n, run in enumerate(runs(ALL_BLOCKS[page], keras=KERAS_MODE)):
        script = tmp_path / f"blocks-{n}.json"
        script.write_text(json.dumps([b.__dict__ for b in run]))
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(script)],
            cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        )
        where = ", ".join(f"{b.page}:{b.line}" for b in run)
        assert proc.returncode == 0, (
            f"docs example failed (blocks at {where}; KERAS_BACKEND={env.get('KERAS_BACKEND')}):\n"
            f"{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
        )


def test_every_python_block_is_collected_and_compiles() -> None:
    """No block escapes (a): each compiles, pages with examples are found, and both engines have blocks."""
    total = sum(len(b) for b in ALL_BLOCKS.values())
    assert total >= 40, f"only {total} python blocks found under docs/: is the fence parser broken?"
    for blocks in ALL_BLOCKS.values():
        for block in blocks:
            compile("\n" * (block.line - 1) + block.code, block.page, "exec")
    keras_pages = [p for p, b in ALL_BLOCKS.items() if runs(b, keras=True)]
    assert {"docs/index.md", "docs/tutorials/keras.md"} <= set(keras_pages), keras_pages
    assert {"docs/index.md", "docs/spec.md", "docs/tutorials/torch.md", "docs/backends/index.md"} <= set(
        p for p, b in ALL_BLOCKS.items() if runs(b, keras=False)
    )


def test_marker_parser_on_a_sample(tmp_path: Path) -> None:
    """The parser reads markers, groups runs and rejects what it would silently skip."""
    sample = tmp_path / "docs" / "sample.md"
    sample.parent.mkdir()
    sample.write_text(
        "text\n```python\na = 1\n```\n<!-- docs-test: new-process -->\n```python\nb = 2\n```\n"
        "<!-- docs-test: keras new-process -->\n```python\nc = 3\n```\n```bash\nnot python\n```\n"
    )
    blocks = parse(sample, tmp_path)
    assert [(b.line, b.code, b.keras, b.new_process) for b in blocks] == [
        (3, "a = 1\n", False, False), (7, "b = 2\n", False, True), (11, "c = 3\n", True, True)]
    assert [[b.code for b in r] for r in runs(blocks, keras=False)] == [["a = 1\n"], ["b = 2\n"]]
    assert [[b.code for b in r] for r in runs(blocks, keras=True)] == [["c = 3\n"]]
    sample.write_text("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="unknown docs-test marker"):
        parse(sample, tmp_path)
    sample.write_text("- item\n\n    ```python\n    x = 1\n    ```\n")
    with pytest.raises(AssertionError, match="indented"):
        parse(sample, tmp_path)


class _Assets(HTMLParser):
    """Collects the URLs a page loads: scripts, stylesheets, preloads, fonts, images, iframes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source") and a.get("src"):
            self.urls.append(a["src"] or "")
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {
            "stylesheet", "preload", "preconnect", "prefetch", "modulepreload", "icon"
        }:
            self.urls.append(a["href"] or "")


def _remote(url: str) -> bool:
    return bool(re.match(r"^(https?:)?//", url.strip(), re.I))


@pytest.mark.subprocess
def test_mkdocs_build_strict_and_offline(tmp_path: Path) -> None:
    """Property (b): ``mkdocs build --strict`` passes and the site loads nothing from the network."""
    site = tmp_path / "site"
    # As on a fresh clone: the API layout (docs/scripts/hooks.py) must be made during the build itself.
    shutil.rmtree(ROOT / "build" / "apidocs", ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    html = sorted(site.rglob("*.html"))
    assert len(html) >= 10, [p.name for p in html]
    remote = []
    for page in html:
        text = page.read_text(encoding="utf-8")
        parser = _Assets()
        parser.feed(text)
        remote += [f"{page.relative_to(site)}: {u}" for u in parser.urls if _remote(u)]
        remote += [f"{page.relative_to(site)}: {m}" for m in re.findall(r"@import\s+url\(['\"]?(?:https?:)?//[^)]*\)", text)]
    for css in site.rglob("*.css"):
        remote += [f"{css.relative_to(site)}: {m}" for m in
                   re.findall(r"url\(['\"]?(?:https?:)?//[^)]*\)", css.read_text(encoding="utf-8", errors="replace"))]
    assert not remote, "the site loads assets from the network:\n" + "\n".join(remote[:20])
    spec = (site / "spec" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in spec, "math on the spec page is not marked for KaTeX"
    assert "javascripts/katex/katex.min.js" in spec and (site / "javascripts" / "katex" / "katex.min.js").is_file()
    fonts = list((site / "javascripts" / "katex" / "fonts").glob("*.woff2"))
    assert len(fonts) >= 10, "KaTeX fonts are not in the site"
    assert "fonts.googleapis" not in spec and "fonts.gstatic" not in spec


@pytest.mark.subprocess
def test_diagram_script_draws_every_committed_diagram(tmp_path: Path) -> None:
    """``docs/scripts/diagrams.py`` still runs, and writes exactly the SVGs the docs commit and show."""
    proc = subprocess.run(
        [sys.executable, str(DOCS / "scripts" / "diagrams.py"), str(tmp_path)],
        cwd=ROOT, env=_env(tmp_path, keras=False), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    drawn = sorted(p.name for p in tmp_path.glob("*.svg"))
    committed = sorted(p.name for p in (DOCS / "assets").glob("*.svg"))
    assert drawn == committed and drawn, (drawn, committed)
    for name in drawn:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert text.lstrip().startswith("<?xml") and "<svg" in text, name
        assert any(f"assets/{name}" in p.read_text(encoding="utf-8") for p in pages()), f"{name} is not shown on any page"


@pytest.mark.subprocess
def test_results_script_prints_the_table_it_documents(tmp_path: Path) -> None:
    """``docs/scripts/results_digits.py`` (behind docs/results.md) still runs: a 3-step, 1-seed smoke run."""
    proc = subprocess.run(
        [sys.executable, str(DOCS / "scripts" / "results_digits.py"), "--steps", "3", "--seeds", "1"],
        cwd=tmp_path, env=_env(tmp_path, keras=False), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["model", "Teacher", "MatTA TA", "MatTA S", "MatTA M", "alone S", "alone M"], proc.stdout
    citing = [p for p in pages() if "results_digits.py" in p.read_text(encoding="utf-8")]
    assert citing, "no page of docs/ shows the table of docs/scripts/results_digits.py (keep its section in results.md)"
    for page in citing:
        text = page.read_text(encoding="utf-8")
        missing = [name for name in rows[1:] if f"| {name} |" not in text]
        assert not missing, f"{page.relative_to(ROOT)} lacks the row(s) {missing} that the script prints"


RULE_REF = re.compile(r"\b[Rr]ules?\s+((?:[A-Z]\d+[a-c]?(?:\s*[–-]\s*[A-Z]?\d+)?(?:\s*,\s*|\s+and\s+|\s+)?)+)")
#: A reference to something outside the repository's spec: a design-document section or an issue.
FOREIGN_REF = re.compile(r"§|\bDESIGN\b|\b[Ii]ssues?\s+#?\d+")
#: The repository's code, tests and docs: the files that may cite rules (vendored assets excluded).
SOURCE_DIRS = ("matta", "backends", "tests", "spec_tests", "benchmarks", "docs", ".ci")
SOURCE_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ""}
ROOT_FILES = ("README.md", "Makefile", "pyproject.toml", "mkdocs.yml", "conftest.py")


def sources() -> list[Path]:
    """Every text file of the code, tests and docs, once (``matta/backends`` may link to ``backends/``)."""
    found: dict[Path, Path] = {}
    candidates = [ROOT / name for name in ROOT_FILES]
    for folder in SOURCE_DIRS:
        candidates += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    for path in candidates:
        rel = path.relative_to(ROOT).parts
        if path.suffix in SOURCE_SUFFIXES and "javascripts" not in rel and "__pycache__" not in rel and path.exists():
            found.setdefault(path.resolve(), path)
    return sorted(found.values())


def _rules_in(text: str) -> set[str]:
    """Rule IDs a text names ("rule S3", "rules G1–G4, N1", "Rules S1 and D2", "rule G1c"), ranges expanded."""
    cited: set[str] = set()
    for group in RULE_REF.findall(re.sub(r"\s+", " ", text)):
        for a, b, c in re.findall(r"([A-Z])(\d+)(?:[a-c])?(?:\s*[–-]\s*[A-Z]?(\d+))?", group):
            cited.update(f"{a}{i}" for i in range(int(b), int(c or b) + 1))
        cited.update(re.findall(r"[A-Z]\d+[a-c]", group))
    return cited


def _cited_rules() -> set[str]:
    """Rule IDs the library's code (``matta/`` and ``backends/``) names."""
    cited: set[str] = set()
    for path in [*(ROOT / "matta").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]:
        cited |= _rules_in(path.read_text(encoding="utf-8"))
    return cited


def _spec_rules() -> tuple[set[str], set[str]]:
    """The numbered rules of docs/spec.md and their lettered sub-rules."""
    spec = (DOCS / "spec.md").read_text(encoding="utf-8")
    defined = set(re.findall(r"^### ([A-Z]\d+) — .*\{#[a-z]\d+\}$", spec, re.M))
    return defined, set(re.findall(r"^\*\*([A-Z]\d+[a-c]) — ", spec, re.M))


def test_the_spec_defines_every_rule_the_code_cites() -> None:
    """Each rule ID in a code comment or docstring is a numbered rule of docs/spec.md, and vice versa."""
    defined, sub_rules = _spec_rules()
    assert defined == {
        "P1", "P2", "P3", "G1", "G2", "G3", "G4", "S1", "S2", "S3", "S4", "D1", "D2", "N1",
        "L1", "L2", "L3", "L4", "L5", "L6", "T1", "T2", "T3", "T4", "T5", "T6", "T7", "E1", "E2", "E3", "E4", "E5", "E6",
    }, sorted(defined)
    cited = _cited_rules()
    assert cited, "no rule citations found in the code: is the pattern broken?"
    assert cited <= defined | sub_rules, f"cited but not defined in docs/spec.md: {sorted(cited - defined - sub_rules)}"
    assert defined <= cited, f"defined in docs/spec.md but named by no code: {sorted(defined - cited)}"
    assert {"G1a", "G1b", "G1c"} <= sub_rules


#: Samples for the self-test below: references the check must refuse, text it must let through, a rule range.
FOREIGN_SAMPLES = ["see DESIGN section 6", "as in issue 4", "Issue #12 asks", "per §7.2"]
FINE_SAMPLES = ["rule S1", "the design of rule T5", "an issue with batches", "docs/backends/index.md"]
RULE_SAMPLE = "rules G1–G3, N1 and rule Z9c"
#: Lines of this file that define the patterns and samples, left out of its own check.
SELF_LINES = ("FOREIGN_REF = ", "FOREIGN_SAMPLES = ", "RULE_SAMPLE = ")


def _checked_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.resolve() == Path(__file__).resolve():
        text = "\n".join("" if line.startswith(SELF_LINES) else line for line in text.split("\n"))
    return text


def test_code_tests_and_docs_cite_only_the_specs_rules() -> None:
    """Every reference in the repository's code, tests and docs is a rule of docs/spec.md: no rule the
    spec lacks, no section of a design document outside the repository, no issue number."""
    defined, sub_rules = _spec_rules()
    files = sources()
    assert {ROOT / "matta" / "model.py", DOCS / "spec.md", ROOT / "Makefile", Path(__file__)} <= set(files)
    undefined, foreign = [], []
    for path in files:
        text = _checked_text(path)
        rel = path.relative_to(ROOT)
        undefined += [f"{rel}: rule {rule}" for rule in sorted(_rules_in(text) - defined - sub_rules)]
        foreign += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if FOREIGN_REF.search(line)]
    assert not undefined, f"rules cited but not defined in docs/spec.md: {undefined}"
    assert not foreign, "references outside the spec (cite a rule ID of docs/spec.md instead):\n" + "\n".join(foreign)


def test_the_reference_checks_catch_what_they_forbid() -> None:
    """The patterns find each foreign reference and expand a rule range (so the check above can fail)."""
    assert all(FOREIGN_REF.search(bad) for bad in FOREIGN_SAMPLES)
    assert not any(FOREIGN_REF.search(fine) for fine in FINE_SAMPLES)
    assert _rules_in(RULE_SAMPLE) == {"G1", "G2", "G3", "N1", "Z9", "Z9c"}
    assert FOREIGN_REF.search(Path(__file__).read_text(encoding="utf-8")) and not FOREIGN_REF.search(
        _checked_text(Path(__file__))), "only the pattern and sample lines are left out of this file's check"
