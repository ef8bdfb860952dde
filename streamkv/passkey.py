"""The pass-key retrieval text (`dataset=passkey`): a filler with one key sentence hidden at a chosen
depth, then a question and the key as the teacher-forced answer. Synthetic, offline, deterministic.

    [filler ... ][ The pass key is 48213. Remember it. 48213 is the pass key.][ filler ... ]
    [ What is the pass key? The pass key is][ 48213]

The text is built from token ids, piece by piece (every piece starts with a space, so the pieces join
as one text would tokenize), which makes positions exact: `answer` marks the answer's tokens that
encode the key digits (not a leading-space token; a tokenizer that merges the space into the first
digit gets that token marked), `key_start` is the key sentence's first key token.

The key depends on the run's `seed` (and `dataset.digits`) only, not on `repeat`: `repeat` labels timing
repeats of one config, which must read the same text (same NLL, same answer), so that their medians
compare timing alone; another seed gives another key (and another run identity).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from streamkv.corpora import CorpusError, load_text

FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
FILLERS = ("repeat", "book", "wiki", "text_file")


@dataclass(frozen=True)
class PasskeyText:
    ids: list  # token ids of the whole text (`length` of them)
    answer: np.ndarray  # bool per text position: the answer's key-digit tokens (the last tokens)
    key: str
    sentence_start: int  # text position of the key sentence's first token
    key_start: int  # text position of the key sentence's first key-digit token
    answer_start: int  # text position of the first answer key-digit token

    @property
    def key_distance(self) -> int:
        """Tokens from the key sentence's first key token to the first answer key token."""
        return self.answer_start - self.key_start


def make_key(seed: int, digits: int) -> str:
    """A `digits`-digit key (no leading zero) from the seed: a hash, so it is the same on every machine
    and numpy version."""
    h = int.from_bytes(hashlib.sha256(f"streamkv-passkey:{int(seed)}:{int(digits)}".encode()).digest()[:8], "big")
    lo = 10 ** (digits - 1) if digits > 1 else 0
    return str(lo + h % (10 ** digits - lo))


def _encode(tokenizer, text: str) -> list:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # the tiny models' ByteTokenizer takes no options (and adds nothing)
        return list(tokenizer.encode(text))


def _digit_tokens(tokenizer, ids: list) -> list:
    """Indices of the tokens whose text holds a digit."""
    return [i for i, t in enumerate(ids) if re.search(r"\d", tokenizer.decode([t]))]


def filler_sentences(filler: str, path: str | None = None):
    """The filler's sentences, in order (the caller cycles through them)."""
    if filler == "repeat":
        return list(FILLER_SENTENCES)
    if filler not in FILLERS:
        raise CorpusError(f"dataset.filler: '{filler}' is not one of {', '.join(FILLERS)}")
    text = load_text(filler, path=path)
    sentences = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise CorpusError(f"dataset.filler={filler}: the text holds no sentences")
    return sentences


def build(tokenizer, length: int, depth: float, digits: int = 5, filler: str = "repeat", seed: int = 0,
          path: str | None = None) -> PasskeyText:
    """The pass-key text of exactly `length` tokens, the key sentence at the filler sentence boundary
    nearest to `depth` x (filler tokens) (so within one filler sentence of it)."""
    key = make_key(seed, digits)
    key_ids = _encode(tokenizer, " " + KEY_SENTENCE.format(key=key))
    question = _encode(tokenizer, " " + QUESTION)
    answer = _encode(tokenizer, " " + key)
    n_fill = length - len(key_ids) - len(question) - len(answer)
    if n_fill < 1:
        raise CorpusError(f"dataset.length: {length} tokens cannot hold the key sentence, the question and the "
                          f"answer ({length - n_fill} tokens) and some filler")
    # whole sentences until there are enough tokens, the surplus cut from the front: the filler ends with
    # a whole sentence before the question, and every boundary left is a sentence start
    sentences = filler_sentences(filler, path)
    stream: list = []
    starts: list = []
    i = 0
    while len(stream) < n_fill:
        starts.append(len(stream))
        stream += _encode(tokenizer, " " + sentences[i % len(sentences)])
        i += 1
    cut = len(stream) - n_fill
    stream = stream[cut:]
    bounds = sorted({0, n_fill, *(s - cut for s in starts if s >= cut)})
    at = min(bounds, key=lambda b: (abs(b - depth * n_fill), b))
    ids = stream[:at] + key_ids + stream[at:] + question + answer
    assert len(ids) == length
    key_digits, ans_digits = _digit_tokens(tokenizer, key_ids), _digit_tokens(tokenizer, answer)
    base = length - len(answer)
    mask = np.zeros(length, dtype=bool)
    mask[[base + j for j in ans_digits]] = True
    got = "".join(tokenizer.decode([answer[j]]) for j in ans_digits).strip()
    if got != key:  # the digit tokens must spell the key and nothing else
        raise CorpusError(f"dataset=passkey: the answer's digit tokens read '{got}', not the key '{key}'")
    return PasskeyText(ids=ids, answer=mask, key=key, sentence_start=at, key_start=at + key_digits[0],
                       answer_start=base + ans_digits[0])


def answer_metrics(nll: np.ndarray, top1: np.ndarray | None, answer: np.ndarray | None) -> dict:
    """answer_nll (mean NLL of the answer's key tokens) and answer_acc (1 if the model's top-1 prediction
    is the target at every one of them, else 0), over the rows of a per-token trace; None without an
    answer (datasets other than passkey)."""
    if answer is None or not np.any(answer):
        return {"answer_nll": None, "answer_acc": None}
    answer = np.asarray(answer, dtype=bool)
    acc = None if top1 is None else int(bool(np.all(np.asarray(top1, dtype=bool)[answer])))
    return {"answer_nll": float(np.mean(np.asarray(nll, dtype=np.float64)[answer])), "answer_acc": acc}
