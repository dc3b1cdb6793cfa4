"""Claims about the documentation that can fail.

(a) Every repository file a Markdown file names (in inline code, a fenced block or a link) exists:
    `dirotq/eval/judge.py`, `docs/DESIGN.md`, `benchmarks/results/x.json`, brace forms such as
    `quality_tiny_pixart.{md,json}` (expanded), `python -m <module>` of a repository module, and
    `<rev>:<path>` (a file in git history, checked with `git cat-file` when the history is there).
    Skipped: placeholders (`<model>`, `*`, `$OUT`, `…`), URLs, absolute paths, and the run outputs
    and generated files of RUN_OUTPUTS / GENERATED below (both must be git-ignored).
(b) No Markdown, shell or Python file names the team's internal notes that are not in the repository
    (shared/DESIGN.md and its siblings, a bare CONVENTIONS.md, DESIGN.md / KERNELS.md without
    `docs/`), nor the documents that were merged away (docs/KERNELS_NOTES.md, docs/EMBEDDED_MODEL.md).
(c) The README carries the two fresh-machine commands verbatim, and CI (`.ci/run`) runs the test one.
(d) Every file of the embedded model's training record is named by a document (the model card's
    "Training record" table), so nothing unexplained is committed there.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Run outputs a doc may name as a destination: created by the commands, never committed.
RUN_OUTPUTS = ("out/", "runs/", ".cache/")
# Generated beside a committed file by a documented command, never committed.
GENERATED = {"plotly.min.js"}  # `python -m analysis sweep-html …` writes it beside the HTML

APP_COMMAND = "bash scripts/install.sh && python3 app.py"
TEST_COMMAND = "bash scripts/install.sh --test && python3 -m pytest"

EXTENSIONS = ("md", "py", "sh", "json", "jsonl", "png", "html", "txt", "log", "toml", "js", "safetensors",
              "yaml", "yml", "cfg", "ini", "csv")
EXT_RE = re.compile(r"\.(%s)$" % "|".join(EXTENSIONS))
PLACEHOLDER_RE = re.compile(r"[<>*$…]|\.\.\.|^~")
REV_PATH_RE = re.compile(r"^([0-9a-f]{7,40}):(.+)$")
# Modules a doc may run with `python -m` that are not repository modules.
EXTERNAL_MODULES = {"pytest", "pip", "venv", "http", "json", "torch", "playwright", "gradio"}


# ---------------------------------------------------------------------------------------------- files
@lru_cache(maxsize=None)
def repo_files() -> tuple[str, ...]:
    """Tracked and new (untracked, not ignored) files that exist in the working tree."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout.decode()
        names = {n for n in out.split("\0") if n}
    else:  # a source tree without git: everything but the usual caches
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "out", "runs", ".cache", "cache"}
        names = set()
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in skip]
            names.update(Path(d, f).relative_to(ROOT).as_posix() for f in files)
    return tuple(sorted(n for n in names if (ROOT / n).is_file()))


@lru_cache(maxsize=None)
def basenames() -> frozenset[str]:
    return frozenset(n.rsplit("/", 1)[-1] for n in repo_files())


def files_with(*suffixes: str) -> list[str]:
    return [n for n in repo_files() if n.endswith(suffixes)]


# ------------------------------------------------------------------------------------ extraction
def expand_braces(token: str) -> list[str]:
    """`a.{md,json}` → [`a.md`, `a.json`] (nested and repeated groups too)."""
    m = re.search(r"\{([^{}]*)\}", token)
    if not m or "," not in m.group(1):
        return [token]
    out = []
    for alt in m.group(1).split(","):
        out.extend(expand_braces(token[:m.start()] + alt + token[m.end():]))
    return out


def code_and_links(text: str) -> tuple[list[str], list[str]]:
    """(code texts: fenced blocks and inline spans, link targets) of a Markdown document."""
    codes = []

    def fenced(m: re.Match) -> str:
        codes.append(m.group(1))
        return "\n"

    text = re.sub(r"^ {0,3}```[^\n]*\n(.*?)^ {0,3}```", fenced, text, flags=re.S | re.M)
    codes += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    links = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return codes, links


def tokens(code: str) -> list[str]:
    out = []
    for tok in code.split():
        tok = tok.strip("'\"(),;[]")
        if "=" in tok and not tok.startswith("-"):
            tok = tok.split("=", 1)[1].strip("'\"")  # VAR=path
        elif tok.startswith("--") and "=" in tok:
            tok = tok.split("=", 1)[1]
        tok = tok.split("::", 1)[0]  # pytest node ids
        if tok:
            out.append(tok)
    return out


def modules_run(code: str) -> list[str]:
    """Module names after `python -m` / `python3 -m`."""
    return [m for m in re.findall(r"\bpython3?\s+-m\s+(\S+)", code) if not PLACEHOLDER_RE.search(m)]


# ---------------------------------------------------------------------------------------- checks
def is_generated(path: str) -> bool:
    return path.startswith(RUN_OUTPUTS) or path.rsplit("/", 1)[-1] in GENERATED


@lru_cache(maxsize=None)
def in_history(rev: str, path: str) -> bool | None:
    """True/False if the commit is known; None where the history is not available (shallow clone)."""
    if not shutil.which("git"):
        return None
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True).returncode:
        return None
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=ROOT, capture_output=True).returncode == 0


def exists(path: str, doc_dir: Path) -> bool:
    path = path.rstrip("/") or path
    for base in (ROOT, doc_dir):
        p = base / path
        if p.exists():
            return True
        # `--report benchmarks/results/quality_tiny_pixart`: an output prefix of committed files
        if not EXT_RE.search(path) and "/" in path:
            rel = p.resolve().relative_to(ROOT).as_posix() if p.resolve().is_relative_to(ROOT) else None
            if rel and any(n.startswith(rel) and n[len(rel)] in "._" for n in repo_files() if len(n) > len(rel)):
                return True
    if "/" not in path:  # a bare file name: named in a context that gives its folder
        return path in basenames()
    return False


def looks_like_path(tok: str, doc_dir: Path) -> bool:
    if "/" not in tok:
        return bool(EXT_RE.search(tok)) and not re.fullmatch(r"\.\w+", tok)
    first = tok.split("/", 1)[0]
    return (bool(first) and ((ROOT / first).exists() or (doc_dir / first).exists() or first in {".", ".."}
                             or (first + "/").startswith(RUN_OUTPUTS))) or bool(EXT_RE.search(tok))


def missing_paths(doc: str) -> list[str]:
    """Names in `doc` (a repository-relative .md path) that point at nothing."""
    doc_dir = (ROOT / doc).parent
    text = (ROOT / doc).read_text(encoding="utf-8")
    codes, links = code_and_links(text)
    bad = []
    for code in codes:
        for mod in modules_run(code):
            top = mod.split(".", 1)[0]
            if top in EXTERNAL_MODULES or not (ROOT / top).is_dir():
                continue
            base = ROOT / mod.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
                    or (base / "__init__.py").is_file()):
                bad.append(f"python -m {mod}")
        for tok in tokens(code):
            if "://" in tok or tok.startswith("/"):
                continue
            m = REV_PATH_RE.match(tok)
            if m:
                if in_history(m.group(1), m.group(2)) is False:
                    bad.append(tok)
                continue
            for name in expand_braces(tok):
                if PLACEHOLDER_RE.search(name) or not looks_like_path(name, doc_dir) or is_generated(name):
                    continue
                if not exists(name, doc_dir):
                    bad.append(name)
    for target in links:
        target = target.split("#", 1)[0]
        if not target or "://" in target or target.startswith(("mailto:", "/")):
            continue
        if not (doc_dir / target).exists():  # links resolve against the document, as on GitHub
            bad.append(f"link {target}")
    return sorted(set(bad))


MD_FILES = files_with(".md")


@pytest.mark.parametrize("doc", MD_FILES)
def test_every_path_named_in_markdown_exists(doc):
    bad = missing_paths(doc)
    assert not bad, f"{doc} names what the repository lacks: {bad}"


# (b) --------------------------------------------------------------------------------------------
FORBIDDEN = [
    (re.compile(r"shared/(DESIGN|CONVENTIONS|KERNELS)\.md"), "an internal note outside the repository"),
    (re.compile(r"\bCONVENTIONS\.md"), "an internal note (its content is in docs/DESIGN.md)"),
    (re.compile(r"(?<!docs/)(?<!\w)(DESIGN|KERNELS)\.md"), "use docs/DESIGN.md or docs/KERNELS.md"),
    (re.compile(r"\b(KERNELS_NOTES|EMBEDDED_MODEL)\.md"), "merged into docs/KERNELS.md / assets/tiny-pixart/README.md"),
]


def forbidden_names(path: str) -> list[str]:
    text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
    hits = []
    for i, line in enumerate(text.splitlines(), 1):
        for rx, why in FORBIDDEN:
            for m in rx.finditer(line):
                hits.append(f"{path}:{i}: {m.group(0)} ({why})")
    return hits


@pytest.mark.parametrize("path", [p for p in files_with(".md", ".sh")])
def test_internal_notes_not_named_in_docs(path):
    assert not forbidden_names(path)


@pytest.mark.parametrize("path", [p for p in files_with(".py") if p != THIS])
def test_internal_notes_not_named_in_code(path):
    assert not forbidden_names(path)


# (c) --------------------------------------------------------------------------------------------
def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = {line.strip() for line in readme.splitlines()}
    assert APP_COMMAND in lines, "README.md lost the app command"
    assert TEST_COMMAND in lines, "README.md lost the test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in {line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")}


# (d) --------------------------------------------------------------------------------------------
def named_anywhere() -> set[str]:
    names = set()
    for doc in MD_FILES:
        codes, links = code_and_links((ROOT / doc).read_text(encoding="utf-8"))
        for tok in itertools.chain.from_iterable(tokens(c) for c in codes):
            for name in expand_braces(tok):
                names.add(name)
                names.add(name.rsplit("/", 1)[-1])
        names.update(t.rsplit("/", 1)[-1] for t in links)
    return names


def test_every_training_record_file_is_named_by_a_doc():
    record = [n for n in repo_files() if n.startswith("benchmarks/results/tiny_pixart_training/")]
    assert record, "the training record is missing"
    named = named_anywhere()
    unnamed = [n for n in record if n not in named and n.rsplit("/", 1)[-1] not in named]
    assert not unnamed, f"committed but named by no doc (name it in assets/tiny-pixart/README.md or delete it): {unnamed}"


def test_allow_listed_generated_files_are_not_committed():
    committed = basenames()
    assert not GENERATED & committed, "a file the docs treat as generated is committed"
    ignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    for name in GENERATED:
        assert name in ignore or f"/{name}" in ignore, f".gitignore should ignore {name}"
    for prefix in RUN_OUTPUTS:
        assert f"/{prefix}" in ignore or prefix in ignore, f".gitignore should ignore {prefix}"
