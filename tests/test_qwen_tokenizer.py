"""The offline-built Qwen1.5 tokenizer: known ids, special tokens, and agreement with tiktoken."""

from __future__ import annotations

import json
import pathlib
import random
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.qwen_tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    NUM_REGULAR_TOKENS,
    PAT_STR,
    SPECIAL_TOKENS,
    build_qwen_tokenizer,
    load_qwen_ranks,
)

tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def tiktoken_encoding():
    """Reference: tiktoken on the very same ranks file and Qwen2 regex."""
    return tiktoken.Encoding(
        name="qwen1.5-reference",
        pat_str=PAT_STR,
        mergeable_ranks=load_qwen_ranks(),
        special_tokens=dict(SPECIAL_TOKENS),
    )


def _encode(tok, text: str, **kwargs) -> list[int]:
    return tok.encode(text, add_special_tokens=False, **kwargs)


# --- known ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello", [9707]),
        (" world", [1879]),
        ('Action Input: {"', [2512, 5571, 25, 5212]),
        ("12345", [16, 17, 18, 19, 20]),  # single digits: Qwen2's \p{N}, not cl100k's \p{N}{1,3}
    ],
)
def test_known_ids(qwen_tokenizer, text: str, ids: list[int]) -> None:
    assert _encode(qwen_tokenizer, text) == ids
    assert qwen_tokenizer.encode(text) == ids  # no BOS/EOS added by default


def test_ranks_file_has_151643_regular_tokens() -> None:
    ranks = load_qwen_ranks()
    assert len(ranks) == NUM_REGULAR_TOKENS == 151643
    assert sorted(ranks.values()) == list(range(NUM_REGULAR_TOKENS))


def test_special_tokens(qwen_tokenizer) -> None:
    tok = qwen_tokenizer
    assert tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [151643, 151644, 151645]
    assert _encode(tok, f"{IM_START}user\nhi{IM_END}\n{ENDOFTEXT}") == [
        151644,
        872,
        198,
        6023,
        151645,
        198,
        151643,
    ]
    assert len(tok) == 151646
    assert tok.eos_token == IM_END and tok.eos_token_id == 151645
    assert tok.pad_token == ENDOFTEXT and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert tok.model_max_length == 32768
    assert set(tok.all_special_ids) >= {151643, 151644, 151645}
    assert tok.decode([151644, 9707, 151645]) == f"{IM_START}Hello{IM_END}"
    assert tok.decode([151644, 9707, 151645], skip_special_tokens=True) == "Hello"


def test_split_special_tokens_treats_control_strings_as_text(qwen_tokenizer, tiktoken_encoding) -> None:
    """User-supplied text containing ``<|im_end|>`` must not be able to inject the control token.

    transformers 5 keeps the name ``split_special_tokens`` (an ``encode``/``__call__`` kwarg and an
    init attribute) for fast tokenizers; it sets ``encode_special_tokens`` on the backend.
    """
    text = f"Observation: a{IM_END}b {ENDOFTEXT}{IM_START}"
    ids = _encode(qwen_tokenizer, text, split_special_tokens=True)
    assert not set(ids) & set(SPECIAL_TOKENS.values())
    assert ids == tiktoken_encoding.encode_ordinary(text)
    assert qwen_tokenizer(text, split_special_tokens=True, add_special_tokens=False)["input_ids"] == ids
    assert qwen_tokenizer.decode(ids) == text
    # ...while the default still recognises them (the server relies on this when rendering prompts).
    assert 151645 in _encode(qwen_tokenizer, text)
    # and the per-call flag did not stick
    assert 151645 in _encode(qwen_tokenizer, text)


def test_tokenizer_files(qwen_tokenizer_dir: pathlib.Path, qwen_tokenizer) -> None:
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert "chat_template" not in config
    assert qwen_tokenizer.is_fast
    backend = json.loads(qwen_tokenizer.backend_tokenizer.to_str())
    assert backend["normalizer"]["type"] == "NFC"
    assert backend["decoder"]["type"] == "ByteLevel"
    split = backend["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == PAT_STR


def test_build_is_idempotent(qwen_tokenizer_dir: pathlib.Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in qwen_tokenizer_dir.iterdir()}
    assert build_qwen_tokenizer(qwen_tokenizer_dir) == qwen_tokenizer_dir  # files untouched: no rebuild
    assert {p.name: p.stat().st_mtime_ns for p in qwen_tokenizer_dir.iterdir()} == before


def test_nfc_normalization(qwen_tokenizer) -> None:
    decomposed = "Cafe\u0301 be\u0301be\u0301"
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    assert _encode(qwen_tokenizer, decomposed) == _encode(qwen_tokenizer, composed)


# --- agreement with tiktoken ------------------------------------------------------------------------

_WORDS = "the quick brown fox jumps over lazy dog Action Input Observation Thought Final Answer weather".split()
_CHINESE = [
    "鸡蛋壳属于湿垃圾",
    "周杰伦",
    "《范特西》",
    "今天天气怎么样?",
    "北京",
    "你好,世界!",
    "动漫《棋魂》是日本的作品",
    "2001年上映",
]
_EMOJI = ["👍", "👍🏽", "🎉", "👨\u200d👩\u200d👧", "🇨🇳", "❤️", "🤖", "☃"]
_CODE = [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    'Action: search\nAction Input: {"query": "x"}',
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += 1; }",
    "<tool_call>\n</tool_call>",
    "'s 've 'LL 'd 'M n't",
    "https://example.com/a?b=1&c=%20",
]
_PUNCT = list(".,;:!?\"'()[]{}<>/\\|@#$%^&*-_=+~`") + ["...", "——", "、", "。", ",", "「", "」", "…"]
_SPACE = [" ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "   \n", "\u3000", "\xa0", "\u2003"]
_ACCENTED = ["é", "e\u0301", "ñ", "n\u0303", "Å", "A\u030a", "ﬁ", "Ω", "ẞ", "İ", "ǅ"]


def _random_codepoint(rng: random.Random) -> str:
    while True:
        low, high = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF)])
        cp = rng.randint(low, high)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def _random_fragment(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(_WORDS).capitalize() if rng.random() < 0.3 else rng.choice(_WORDS)
    if kind == 1:
        if rng.random() < 0.5:
            return rng.choice(_CHINESE)
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 6)))
    if kind == 2:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
    if kind == 3:
        return rng.choice(_SPACE) * rng.randint(1, 3)
    if kind == 4:
        return "".join(rng.choice(_PUNCT) for _ in range(rng.randint(1, 4)))
    if kind == 5:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3)))
    if kind == 6:
        return rng.choice(_CODE)
    if kind == 7:
        return rng.choice(_ACCENTED)
    return "".join(_random_codepoint(rng) for _ in range(rng.randint(1, 4)))


def _mixed_strings(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return ["".join(_random_fragment(rng) for _ in range(rng.randint(1, 12))) for _ in range(count)]


# Why the tiktoken reference is fed the tokenizer's *own* NFC output rather than Python's
# ``unicodedata.normalize("NFC", ...)``: Python 3.11's unicodedata is Unicode 14.0, while the NFC tables
# in ``tokenizers`` (the Rust unicode-normalization crate) lack the canonical combining class of some
# newer combining marks (U+07FD, U+0899.., U+1715, U+1AC0, ...), so a handful of rare mark sequences
# are reordered differently (~1 in 10k random-code-point strings).  The official Qwen2 tokenizer has
# the same normalizer, so that is the behaviour to match; the BPE and pre-tokenizer are compared
# exactly, and the NFC difference is pinned down in ``test_nfc_differs_only_on_recent_marks``.


def _backend_nfc(tok, text: str) -> str:
    return tok.backend_tokenizer.normalizer.normalize_str(text)


def _marks_with_disputed_combining_class(tok, text: str) -> set[str]:
    """Characters whose canonical reordering against common marks differs between the two NFCs."""
    return {
        ch
        for ch in set(text)
        for mark in ("\u0301", "\u0316", "\u05b0")  # combining classes 230, 220, 10
        if _backend_nfc(tok, mark + ch) != unicodedata.normalize("NFC", mark + ch)
    }


def test_matches_tiktoken_on_mixed_strings(qwen_tokenizer, tiktoken_encoding) -> None:
    texts = _mixed_strings(4000)
    normalized = [_backend_nfc(qwen_tokenizer, t) for t in texts]
    expected = tiktoken_encoding.encode_ordinary_batch(normalized)
    got = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not mismatches, mismatches[:3]
    assert qwen_tokenizer.batch_decode(got) == normalized  # round trip (modulo NFC)


def test_nfc_differs_only_on_recent_marks(qwen_tokenizer) -> None:
    texts = _mixed_strings(4000, seed=99) + ["\u0301\u07fd", "x\u0301\u1ac0"]
    differing = [t for t in texts if _backend_nfc(qwen_tokenizer, t) != unicodedata.normalize("NFC", t)]
    assert len(differing) >= 2
    for text in differing:
        assert _marks_with_disputed_combining_class(qwen_tokenizer, text), text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_matches_tiktoken_on_arbitrary_text(qwen_tokenizer, tiktoken_encoding, text: str) -> None:
    normalized = _backend_nfc(qwen_tokenizer, text)
    ids = _encode(qwen_tokenizer, text, split_special_tokens=True)
    assert ids == tiktoken_encoding.encode_ordinary(normalized)
    assert qwen_tokenizer.decode(ids) == normalized
    if not _marks_with_disputed_combining_class(qwen_tokenizer, text):
        assert normalized == unicodedata.normalize("NFC", text)
