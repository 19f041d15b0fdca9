"""Text corpora as token tensors, and deterministic batches drawn from them.

The default corpus is the source of the running interpreter's standard library (``Lib/*.py``): a few MB of real
text that every Python installation ships, so the lab needs no download. ``--data`` takes a text file, a
directory or glob of text files, or nanoGPT's pre-tokenised ``.bin`` files (uint16). Tokens are bytes by default;
``tokenizer="bpe"`` trains a byte-level BPE locally with the ``tokenizers`` library.

Batches are a pure function of (seed, step): no RNG state to save, so a resumed run reads the same data.
"""

from __future__ import annotations

import glob
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BLOCK_BYTES = 1 << 16  # unit of the train/val split: every `val_every`-th block of the corpus is held out


@dataclass
class Corpus:
    train: torch.Tensor  # token ids, 1-D: uint8 from bytes, int64 from BPE, uint16 (memory-mapped) from .bin files
    val: torch.Tensor
    vocab_size: int
    info: dict  # what produced these tokens: source, files, tokenizer, sha256, python version


def default_corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def _docs_texts() -> list[bytes]:
    """English prose that ships with Python: the reference topics ``pydoc`` shows, then the docstrings of the
    standard library's top-level modules (the files of the default corpus, whose code is left out)."""
    import ast

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        topics = {}
    texts = [topics[k].encode() for k in sorted(topics)]
    for f in default_corpus_files():
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc.encode() + b"\n\n")
    return texts


def _header_files() -> list[Path]:
    """C: the interpreter's own headers (``Python.h`` and the rest), where the installation has them."""
    include = Path(sysconfig.get_paths()["include"])
    files = sorted(include.rglob("*.h"))
    if not files:
        raise FileNotFoundError(
            f"--data python-headers: no C headers under {include} (install your Python's development package)"
        )
    return files


def _torch_files() -> list[Path]:
    """The Python source of the installed torch (about 46 MB for 2.13.0): the lab's one dependency that every
    installation has, ten times the standard library, for the sizes whose runs need more tokens than it holds. Its
    fingerprint pins the torch version it came from."""
    root = Path(torch.__file__).parent
    return sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix())


#: built-in corpora, by name (``--data NAME``; a path of that name, if there is one, wins): text that every Python
#: installation and the lab's own dependencies ship, so nothing is downloaded. The default and two held-out kinds of
#: text, so a default is never tuned to one corpus, and a large one for the scaling study
BUILTIN_CORPORA = ("python-stdlib", "python-docs", "python-headers", "torch-source")


def _text_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(
            f"--data {path!r}: no such file, directory or glob match, nor a built-in corpus "
            f"({', '.join(BUILTIN_CORPORA)})"
        )
    return files


def _read_bin(path: Path) -> torch.Tensor:
    """uint16 token ids, memory-mapped: a 17 GB openwebtext train.bin is read only where batches fall."""
    import warnings

    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(
            f"--data {path}: a .bin file holds uint16 token ids (2 bytes each), and this one has {size:,} bytes; "
            f"write it with numpy's uint16 (nanoGPT's prepare.py)"
        )

    import numpy as np

    with warnings.catch_warnings():  # torch warns that the read-only map is not writable; it is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r"))


def _split(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out every n-th block of the corpus, so validation text comes from all over it, not only its end."""
    every = max(2, round(1 / val_fraction))
    blocks = list(torch.split(tokens, BLOCK_BYTES))
    if len(blocks) < every:  # a small corpus: hold out its tail
        cut = int(len(tokens) * (1 - val_fraction))
        return tokens[:cut], tokens[cut:]
    val = [b for i, b in enumerate(blocks) if i % every == every - 1]
    train = [b for i, b in enumerate(blocks) if i % every != every - 1]
    return torch.cat(train), torch.cat(val)


def _bpe_encode(texts: list[str], vocab_size: int) -> tuple[torch.Tensor, int]:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError(
            "tokenizer 'bpe' needs the `tokenizers` package: pip install tokenizers (or use --tokenizer byte)"
        ) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.int64), tok.get_vocab_size()


def _sources(data: str | None) -> tuple[str, list[Path], list[bytes] | None]:
    """What ``data`` names: (its source name, its files, and its texts when they are not whole files)."""
    if data is None or (data in BUILTIN_CORPORA and not Path(data).exists()):
        name = data or "python-stdlib"
        if name == "python-docs":
            return name, [], _docs_texts()
        files = {"python-headers": _header_files, "torch-source": _torch_files}.get(name, default_corpus_files)
        return name, files(), None
    return str(data), _text_files(data), None


def load_corpus(
    data: str | None = None, tokenizer: str = "byte", bpe_vocab: int = 4096, val_fraction: float = 0.1
) -> Corpus:
    """Tokens of ``data`` (None: the standard library's source), split deterministically into train and val."""
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    source, files, raw = _sources(data)
    info: dict = {
        "source": source,
        "files": len(files) if raw is None else len(raw),
        "python": sys.version.split()[0],
    }
    bins = [f for f in files if f.suffix == ".bin"]
    if bins:  # pre-tokenised; other files beside them (nanoGPT's meta.pkl, input.txt) are not read
        by_name = {f.stem: f for f in bins}
        if "train" in by_name and "val" in by_name:  # nanoGPT's prepare.py layout
            train, val = _read_bin(by_name["train"]), _read_bin(by_name["val"])
        else:
            train, val = _split(torch.cat([_read_bin(f) for f in bins]), val_fraction)
        largest = max(int(t.numpy().max()) for t in (train, val) if len(t))
        vocab_size = 64 * -(-(largest + 1) // 64)  # round up to a multiple of 64
        info["tokenizer"] = "pre-tokenised uint16"
        info["files"] = len(bins)
        digest = hashlib.sha256(memoryview(train.numpy()))
        digest.update(memoryview(val.numpy()))
    else:
        raw = [f.read_bytes() for f in files] if raw is None else raw
        digest = hashlib.sha256(b"".join(raw))
        if tokenizer == "byte":
            buf = bytearray(b"".join(raw))
            # bytes stay bytes (a batch widens its own windows): a 46 MB corpus is 46 MB, not 370
            tokens = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            vocab_size = 256
        else:
            tokens, vocab_size = _bpe_encode([r.decode("utf-8", errors="replace") for r in raw], bpe_vocab)
        info["tokenizer"] = tokenizer if tokenizer == "byte" else f"bpe-{vocab_size}"
        train, val = _split(tokens, val_fraction)
    info["sha256"] = digest.hexdigest()[:16]
    info["train_tokens"], info["val_tokens"] = len(train), len(val)
    return Corpus(train=train, val=val, vocab_size=vocab_size, info=info)


def fingerprint(data: str | None) -> str:
    """The sha256 (first 16 hex digits) that ``load_corpus(data).info`` records, without tokenizing: what identifies
    a corpus by its contents, wherever it lies."""
    _, files, raw = _sources(data)
    bins = [f for f in files if f.suffix == ".bin"]
    if not bins:
        digest = hashlib.sha256()
        for text in raw if raw is not None else (f.read_bytes() for f in files):
            digest.update(text)
        return digest.hexdigest()[:16]
    return load_corpus(data).info["sha256"]  # memory-mapped: cheap


def check_size(corpus: Corpus, block_size: int, data: str | None) -> None:
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        if len(split) <= block_size + 1:
            raise ValueError(
                f"--data {data!r}: the {name} split has {len(split)} tokens, fewer than one block of "
                f"{block_size + 1}; give more text or a smaller preset"
            )


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, seed: int, step: int):
    """Batch number ``step`` of a run seeded ``seed``: random windows of ``tokens``, the same every time."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=gen)
    offsets = torch.arange(block_size + 1)
    window = tokens[starts[:, None] + offsets].long()
    return window[:, :-1], window[:, 1:]


def limit_unique(tokens: torch.Tensor, unique_tokens: int | None) -> torch.Tensor:
    """The first ``unique_tokens`` of the train split: training then repeats it for several epochs."""
    if unique_tokens is None:
        return tokens
    if unique_tokens <= 0:
        raise ValueError(f"--unique-tokens must be positive, got {unique_tokens}")
    return tokens[:unique_tokens]
