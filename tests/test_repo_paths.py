"""No committed text file names an absolute path of a machine (a home, a work dir): records, reports and
docs must read the same on any checkout. Paths inside a sweep dir are relative to it
(scripts/relativize_records.py), the analysis writes paths relative to where it ran."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT

MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home)/")
# Files that spell such a path on purpose: this test (its own examples).
ALLOWED = {"tests/test_repo_paths.py"}
BINARY = (".png", ".parquet", ".gz", ".pt", ".bin")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.decode().split("\0") if p]


def test_no_committed_file_names_a_machine_path():
    offenders = []
    for rel in _tracked():
        if rel in ALLOWED or rel.endswith(BINARY):
            continue
        path = ROOT / rel
        if not path.is_file():
            continue  # deleted in the working tree
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for m in MACHINE_PATH.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            offenders.append(f"{rel}:{line}: {text[m.start():m.start() + 60].splitlines()[0]}")
    assert not offenders, "absolute machine paths in committed files:\n" + "\n".join(offenders[:20])


def test_the_pattern_catches_what_it_should():
    assert MACHINE_PATH.search("cwd: /home/alice/streamkv") and MACHINE_PATH.search('"/root/x"')
    assert MACHINE_PATH.search("see /home/user/file")
    assert not MACHINE_PATH.search("docs/work/x") and not MACHINE_PATH.search("https://host/root/")


def test_relativize_records_rewrites_sweep_and_checkout_paths(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("relativize", ROOT / "scripts" / "relativize_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweep = tmp_path / "b2_book"
    (sweep / "3" / ".hydra").mkdir(parents=True)
    hydra = ("hydra:\n  sweep:\n    dir: /srv/sw/b2_book\n    subdir: 3\n  runtime:\n    cwd: /home/alice/streamkv\n"
             "    config_sources:\n    - path: /home/alice/streamkv/conf\n    output_dir: /srv/sw/b2_book/3\n")
    (sweep / "3" / ".hydra" / "hydra.yaml").write_text(hydra.replace("/srv/", "/scratch/"))
    (sweep / "3" / "job-status.json").write_text('{"status": "skipped", "detail": "/scratch/sw/b2_book/1"}\n')
    assert mod.main([str(sweep)]) == 0
    text = (sweep / "3" / ".hydra" / "hydra.yaml").read_text()
    assert "dir: .\n" in text and "cwd: .\n" in text and "path: conf\n" in text and "output_dir: 3\n" in text
    assert '"detail": "1"' in (sweep / "3" / "job-status.json").read_text()
    assert mod.main(["--check", str(sweep)]) == 0  # nothing left to change
