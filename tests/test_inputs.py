"""Input checks before anything heavy: unknown keys, the text file and a local model directory fail
in one line naming the field before any job runs; a text too short for the prefill fails before the
weights load."""

from __future__ import annotations

import time

import pytest

from conftest import compose, run_cli

BAD_INPUTS = [
    (["+compres_every=32", "model=tiny_llama"], "compres_every: unknown key (did you mean compress_every?)"),
    (["+policy.max_dorp=3", "model=tiny_llama"], "policy.max_dorp: unknown key (did you mean policy.max_drop?)"),
    (["-m", "+sweep=demo", "+windw=16"], "windw: unknown key (did you mean window?)"),
    (["dataset=text_file", "dataset.path=/no/such/file"], "dataset.path: no such file: /no/such/file"),
    (["model=hf", "model.name_or_path=/no/such/dir"], "model.name_or_path: no such directory: /no/such/dir"),
    (["model=hf", "model.name_or_path=./no/such/dir"], "model.name_or_path: no such directory: ./no/such/dir"),
    (["model=hf", "model.name_or_path=a/b/c"], "model.name_or_path: no such directory: a/b/c"),
]


def _fails_fast(proc, message: str, tmp_path, start: float) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Repo id" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # nothing ran
    assert time.time() - start < 30


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_anything_runs(args, message, tmp_path):
    start = time.time()
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep", timeout=60)
    _fails_fast(proc, message, tmp_path, start)


@pytest.mark.parametrize("content,message", [("", "file is empty"), (" \n\t\n", "file is empty"),
                                             (None, "not a file")], ids=["empty", "whitespace", "a-directory"])
def test_unusable_text_file_fails_before_anything_runs(content, message, tmp_path):
    src = tmp_path / "text.txt"
    src.mkdir() if content is None else src.write_text(content)
    start = time.time()
    proc = run_cli("model=tiny_llama", "dataset=text_file", f"dataset.path={src}", f"hydra.run.dir={tmp_path}/run",
                   timeout=60)
    _fails_fast(proc, f"dataset.path: {message}: {src}", tmp_path, start)


def test_model_dir_without_config_json_is_named(tmp_path):
    start = time.time()
    proc = run_cli("model=hf", f"model.name_or_path={tmp_path}", f"hydra.run.dir={tmp_path}/run", timeout=60)
    _fails_fast(proc, f"model.name_or_path: {tmp_path} has no config.json", tmp_path, start)


def test_sweep_presets_and_schema_keys_still_pass():
    from streamkv.config import ConfigError
    from streamkv.inputs import check_known_keys

    check_known_keys(compose("model=tiny_llama", "+sweep=phase_a"))  # a group, not a key: allowed
    with pytest.raises(ConfigError, match=r"^model\.hiden_size: unknown key \(did you mean model\.hidden_size\?\)$"):
        check_known_keys(compose("model=tiny_llama", "+model.hiden_size=8"))
    with pytest.raises(ConfigError, match=r"^zzz: unknown key \(known keys: backend, cache, "):
        check_known_keys(compose("model=tiny_llama", "+zzz=1"))


def test_hub_ids_are_not_taken_for_paths():
    from streamkv.inputs import check_model_dir, looks_like_path

    assert not looks_like_path("HuggingFaceTB/SmolLM2-360M") and not looks_like_path("gpt2")
    assert looks_like_path("/abs/dir") and looks_like_path("./rel") and looks_like_path("~/m")
    assert looks_like_path("models/org/name")
    check_model_dir("EleutherAI/pythia-2.8b")  # no file-system check for a hub id


def test_text_shorter_than_prefill_fails_before_the_weights_load(tmp_path, monkeypatch):
    from streamkv import runner
    from streamkv.config import ConfigError

    src = tmp_path / "short.txt"
    src.write_text("tiny")
    loaded = []
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded"))
    monkeypatch.setattr(runner, "_MODEL_MEMO", {})
    monkeypatch.setattr(runner, "_TEXT_MEMO", {})
    cfg = compose("model=tiny_llama", "dataset=text_file", f"dataset.path={src}", "prefill_tokens=10")
    with pytest.raises(ConfigError) as err:
        runner.run_job(cfg, tmp_path / "run")
    assert str(err.value) == (f"prefill_tokens: the text of dataset.path={src} has only 4 tokens; "
                              f"need more than prefill_tokens=10")  # byte tokenizer: 'tiny'
    assert not loaded


def test_passkey_text_file_filler_is_checked_before_loading():
    """dataset=passkey with a text-file filler: a missing dataset.path fails in the precheck, in one line."""
    from streamkv.cli import precheck
    from streamkv.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        precheck(["model=tiny_llama", "dataset=passkey", "dataset.filler=text_file", "dataset.path=/no/such/file",
                  "device=cpu"])
    assert "dataset.path" in str(err.value) and "\n" not in str(err.value)
