"""IncrementalDetokenizer with the real Qwen1.5 tokenizer: no split characters, exact concatenation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.format.detokenize import IncrementalDetokenizer

STRATEGIES = ["bytes", "window"]

TEXTS = [
    "鸡蛋壳属于湿垃圾。生鸡蛋壳和熟鸡蛋壳都是湿垃圾,包裹着鸡蛋壳的餐巾纸是干垃圾。",
    "《爱在西元前》是周杰伦演唱的歌曲,收录于专辑《范特西》。",
    "动漫《棋魂》是日本的作品,2001年上映。",
    "👍🏽🎉 family: 👨\u200d👩\u200d👧",
    'Thought: 我需要查天气 🌦️\nAction: get_weather\nAction Input: {"city": "北京", "unit": "°C"}\n',
    "Final Answer: Ça coûte 12€ — très cher! 日本語とEnglishのmix 🇯🇵🇬🇧 ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_auto_picks_bytes_for_qwen(qwen_tokenizer) -> None:
    assert IncrementalDetokenizer(qwen_tokenizer).strategy == "bytes"
    with pytest.raises(ValueError):
        IncrementalDetokenizer(qwen_tokenizer, strategy="nope")  # type: ignore[arg-type]


def test_texts_do_split_characters_across_tokens(qwen_tokenizer) -> None:
    """The point of the exercise: decoding token by token would produce U+FFFD for these."""
    for text in TEXTS[3:6]:
        ids = qwen_tokenizer.encode(text, add_special_tokens=False)
        assert "\ufffd" in "".join(qwen_tokenizer.decode([i]) for i in ids), text


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(qwen_tokenizer, text: str, strategy: str) -> None:
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    chunks = _stream(IncrementalDetokenizer(qwen_tokenizer, strategy=strategy), ids)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == qwen_tokenizer.decode(ids) == text
    assert chunks[-1] == ""  # nothing left over for valid text


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_text_is_emitted_as_soon_as_complete(qwen_tokenizer, strategy: str) -> None:
    text = "鸡蛋壳属于湿垃圾。🦩 👨\u200d👩\u200d👧 𝔘𝔫𝔦"
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(qwen_tokenizer, strategy=strategy)
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        emitted += detok.push(token_id)
        full = qwen_tokenizer.decode(ids[:n])
        if strategy == "bytes":
            # Everything except the bytes of a trailing incomplete character has been emitted.
            assert emitted == full.rstrip("\ufffd")
        else:
            # The window strategy holds back whole tokens: a token such as " \xf0\x9f\x91" (space +
            # start of an emoji) delays its space until the emoji is complete.
            assert full.startswith(emitted)
            if not full.endswith("\ufffd"):
                assert emitted == full


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_special_tokens(qwen_tokenizer, strategy: str) -> None:
    ids = qwen_tokenizer.encode("<|im_start|>assistant\n鸡蛋壳<|im_end|>\n<|endoftext|>", add_special_tokens=False)
    assert 151645 in ids
    assert "".join(_stream(IncrementalDetokenizer(qwen_tokenizer, strategy=strategy), ids)) == (
        "<|im_start|>assistant\n鸡蛋壳<|im_end|>\n<|endoftext|>"
    )
    skipped = _stream(IncrementalDetokenizer(qwen_tokenizer, skip_special_tokens=True, strategy=strategy), ids)
    assert "".join(skipped) == qwen_tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n鸡蛋壳\n"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_incomplete_tail_is_flushed_like_decode(qwen_tokenizer, strategy: str) -> None:
    ids = qwen_tokenizer.encode("好🦩", add_special_tokens=False)[:-1]  # 🦩 is two tokens: cut inside it
    full = qwen_tokenizer.decode(ids)
    assert full.endswith("\ufffd")
    detok = IncrementalDetokenizer(qwen_tokenizer, strategy=strategy)
    pushed = "".join(detok.push(i) for i in ids)
    assert "\ufffd" not in pushed
    assert pushed + detok.flush() == full
    # flush resets: the instance can be reused.
    assert "".join(_stream(detok, qwen_tokenizer.encode("再见", add_special_tokens=False))) == "再见"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_token_ids_including_invalid_utf8(qwen_tokenizer, strategy: str) -> None:
    """Arbitrary id sequences (lone continuation bytes, truncated characters, specials, unknown ids)."""
    rng = random.Random(7)
    fragments = ["Ġ", "a", "é", "¸", "¡", "ð", "Ł", "ĳ", "į", "âĢ"]  # byte-level spellings of bytes
    single_bytes = [qwen_tokenizer.convert_tokens_to_ids(t) for t in fragments]
    for _ in range(300):
        ids = [
            rng.choice(single_bytes) if rng.random() < 0.5 else rng.randrange(151700)  # > 151645: unknown
            for _ in range(rng.randint(0, 25))
        ]
        chunks = _stream(IncrementalDetokenizer(qwen_tokenizer, strategy=strategy), ids)
        assert "".join(chunks) == qwen_tokenizer.decode(ids), ids


def test_window_stays_bounded(qwen_tokenizer) -> None:
    """The window strategy drops ids it no longer needs (O(1)-ish work per token)."""
    ids = qwen_tokenizer.encode(TEXTS[0] * 50, add_special_tokens=False)
    detok = IncrementalDetokenizer(qwen_tokenizer, strategy="window")
    longest = 0
    for token_id in ids:
        detok.push(token_id)
        longest = max(longest, len(detok._ids))
    assert longest <= 8


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80), strategy=st.sampled_from(STRATEGIES))
def test_property_arbitrary_text(qwen_tokenizer, text: str, strategy: str) -> None:
    ids = qwen_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    full = qwen_tokenizer.decode(ids)
    chunks = _stream(IncrementalDetokenizer(qwen_tokenizer, strategy=strategy), ids)
    assert "".join(chunks) == full
    if "\ufffd" not in text:
        assert not any("\ufffd" in chunk for chunk in chunks)
