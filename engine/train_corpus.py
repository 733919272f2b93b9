"""The training corpus of the trained model pair: the running interpreter's standard library.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, minus site-packages, the test
suites and the two directories that are mostly data tables (``encodings``, ``pydoc_data``).
Files are ordered by the sha256 of their relative path, a fixed shuffle, so that a byte cap
samples the whole library rather than its alphabetical front; every ``heldout_every``-th file
of that order is held out for evaluation. Each file is encoded as ``<|bos|> text <|eos|>``
and the files are concatenated into one stream.

The held-out stream is saved beside each checkpoint (``heldout.bin``: uint16 little-endian
token ids; ``heldout.json``: the files, their start offsets and the tokenizer's digest), so
a quality benchmark reads exactly the tokens the losses in ``training.json`` were taken on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pdserve.bpe import EOS_TOKEN
from pdserve.modelgen import write_json

SKIPPED_DIRS = ("site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data")
HELDOUT_BIN = "heldout.bin"
HELDOUT_JSON = "heldout.json"


@dataclass(frozen=True, slots=True)
class TokenStream:
    """Files encoded and concatenated: ``token_ids`` and where each file starts in it."""

    files: tuple[str, ...]  # relative to the stdlib root
    starts: tuple[int, ...]
    token_ids: np.ndarray  # [N] int64
    num_bytes: int


@dataclass(frozen=True, slots=True)
class Corpus:
    """The train and held-out streams, and where they came from."""

    stdlib: Path
    train: TokenStream
    heldout: TokenStream

    def describe(self, max_bytes: int, heldout_every: int) -> dict[str, Any]:
        """The corpus part of training.json."""
        return {
            "source": "python standard library *.py",
            "python_version": platform.python_version(),
            "stdlib_path": str(self.stdlib),
            "skipped_dirs": list(SKIPPED_DIRS),
            "max_bytes": max_bytes,
            "heldout_every": heldout_every,
            "num_files": len(self.train.files) + len(self.heldout.files),
            "num_train_files": len(self.train.files),
            "num_heldout_files": len(self.heldout.files),
            "bytes": self.train.num_bytes + self.heldout.num_bytes,
            "train_tokens": len(self.train.token_ids),
            "heldout_tokens": len(self.heldout.token_ids),
        }


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, max_bytes: int) -> list[Path]:
    """The files of the corpus in their fixed order, up to ``max_bytes`` in all."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} is invalid: must be >= 1")
    candidates = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in SKIPPED_DIRS]
        candidates += [Path(directory, name) for name in names if name.endswith(".py")]
    candidates.sort(key=lambda path: hashlib.sha256(
        path.relative_to(root).as_posix().encode()).hexdigest())
    chosen, total = [], 0
    for path in candidates:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise RuntimeError(f"no *.py files under {root}: the corpus is empty")
    return chosen


def build_corpus(tokenizer: Tokenizer, max_bytes: int, heldout_every: int) -> Corpus:
    """Read, split and encode the corpus (deterministic for one Python installation)."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every={heldout_every} is invalid: must be >= 2")
    root = stdlib_root()
    files = corpus_files(root, max_bytes)
    heldout = [path for i, path in enumerate(files) if i % heldout_every == heldout_every - 1]
    train = [path for i, path in enumerate(files) if i % heldout_every != heldout_every - 1]
    if not heldout:
        raise ValueError(f"max_bytes={max_bytes} gives {len(files)} files, too few to hold "
                         f"out every {heldout_every}th: raise max_bytes")
    return Corpus(root, encode_files(tokenizer, root, train),
                  encode_files(tokenizer, root, heldout))


def encode_files(tokenizer: Tokenizer, root: Path, files: list[Path]) -> TokenStream:
    """Each file as ``<|bos|> text <|eos|>`` (undecodable bytes replaced), concatenated."""
    raw = [path.read_bytes() for path in files]
    texts = [data.decode("utf-8", errors="replace") for data in raw]
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    pieces = [encoding.ids + [eos_id] for encoding in tokenizer.encode_batch(texts)]
    starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]])
    return TokenStream(tuple(path.relative_to(root).as_posix() for path in files),
                       tuple(int(s) for s in starts),
                       np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]),
                       sum(len(data) for data in raw))


def save_heldout(out: Path, stream: TokenStream, tokenizer_digest: str) -> None:
    """heldout.bin and heldout.json into a checkpoint directory."""
    out.joinpath(HELDOUT_BIN).write_bytes(stream.token_ids.astype("<u2").tobytes())
    write_json(out / HELDOUT_JSON, {
        "format": "uint16 little-endian token ids, files concatenated, each <|bos|> ... <|eos|>",
        "files": list(stream.files),
        "starts": list(stream.starts),
        "num_tokens": len(stream.token_ids),
        "tokenizer_sha256": tokenizer_digest,
    })


def load_heldout(model_dir: str | Path) -> list[int]:
    """The held-out token ids saved beside a trained checkpoint; ValueError if there are
    none, or if they were encoded with another tokenizer than the directory's."""
    model_dir = Path(model_dir)
    bin_path, json_path = model_dir / HELDOUT_BIN, model_dir / HELDOUT_JSON
    if not (bin_path.is_file() and json_path.is_file()):
        raise ValueError(f"{model_dir} holds no {HELDOUT_BIN}/{HELDOUT_JSON}: give a "
                         f"directory written by `pdserve model train`")
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    digest = tokenizer_digest(model_dir / "tokenizer.json")
    if meta["tokenizer_sha256"] != digest:
        raise ValueError(f"{json_path}: the held-out tokens were encoded with another "
                         f"tokenizer than {model_dir / 'tokenizer.json'}")
    token_ids = np.frombuffer(bin_path.read_bytes(), dtype="<u2")
    if len(token_ids) != meta["num_tokens"]:
        raise ValueError(f"{bin_path} holds {len(token_ids)} tokens, {json_path} says "
                         f"num_tokens={meta['num_tokens']}")
    return token_ids.astype(np.int64).tolist()


def tokenizer_digest(path: Path) -> str:
    """sha256 of a tokenizer.json: which tokenizer held-out ids were encoded with."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
