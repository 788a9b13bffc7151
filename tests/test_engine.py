"""The engine on a real (tiny, random) model: batching correctness, sampling, admission, cancellation."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from server.engine.base import EngineOverloaded, SamplingParams, StepOutput
from server.engine.builtin import BuiltinEngine, load_model
from server.format.grammar import JSON_WHITESPACE


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    # Random weights repeat one token; sharper, varied logits make the comparisons meaningful.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model, tokenizer


@pytest.fixture()
def engine(loaded):
    model, tokenizer = loaded
    eng = BuiltinEngine(model, tokenizer, max_running=4, max_queued=2, max_model_len=512)
    eng.start_manager()
    yield eng
    eng.stop_manager()


async def collect(engine: BuiltinEngine, ids: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for step in engine.submit(ids, params):
        tokens += step.token_ids
        finish = step.finish_reason
    return tokens, finish


PROMPTS = ["Hello world", "What is the weather in Paris? " * 6, "鸡蛋壳属于哪种类型的垃圾?", "1 2 3 4 5 6 7 8 9"]


def test_concurrent_greedy_equals_generate(engine, loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(*[collect(engine, p, SamplingParams(max_new_tokens=12, temperature=0)) for p in prompts])

    results = asyncio.run(main())
    for ids, (tokens, finish) in zip(prompts, results):
        reference = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                   eos_token_id=engine.stop_ids, pad_token_id=engine.stop_ids[0])[0, len(ids):].tolist()
        expected = [t for t in reference if t not in engine.stop_ids]
        assert tokens == expected
        assert finish == ("length" if len(tokens) == 12 else "stop")


def test_seed_reproducible_whatever_the_batch(engine, loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode("Tell me a story")
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42)

    async def alone():
        return await collect(engine, ids, sampled)

    async def crowded():
        others = [collect(engine, tokenizer.encode(p), SamplingParams(max_new_tokens=10, temperature=0.7)) for p in PROMPTS[:3]]
        results = await asyncio.gather(collect(engine, ids, sampled), *others)
        return results[0]

    assert asyncio.run(alone()) == asyncio.run(crowded())


def test_grammar_holds_each_sequence_of_a_mixed_batch(engine, loaded):
    """Constrained (greedy and sampled) and free sequences side by side: each keeps its own matcher."""
    import jsonschema

    _, tokenizer = loaded
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["a", "b", None]}}, "required": ["n", "tag"],
              "additionalProperties": False}
    grammar = 'start: " " %json ' + json.dumps({**schema, "x-guidance": JSON_WHITESPACE})
    params = [SamplingParams(max_new_tokens=40, temperature=0, grammar=grammar),
              SamplingParams(max_new_tokens=40, temperature=1.0, seed=5, grammar=grammar),
              SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.5, seed=6, grammar=grammar),
              SamplingParams(max_new_tokens=8, temperature=0)]

    async def main():
        return await asyncio.gather(*[collect(engine, tokenizer.encode(p), sp) for p, sp in zip(PROMPTS, params)])

    results = asyncio.run(main())
    for tokens, finish in results[:3]:
        text = tokenizer.decode(tokens)
        assert finish == "stop" and text.startswith(" {")
        jsonschema.validate(json.loads(text), schema)
    assert results[3][1] in ("stop", "length")
    assert len(engine.sampler) == 0


def test_cancel_frees_the_slot_within_a_step(engine, loaded):
    _, tokenizer = loaded

    async def main():
        generation = engine.submit(tokenizer.encode(PROMPTS[1]), SamplingParams(max_new_tokens=400, temperature=0))
        first = await generation.__anext__()
        assert isinstance(first, StepOutput) and engine.running == 1
        await generation.aclose()
        assert (engine.running, engine.admitted) == (0, 0)
        # The manager dropped it: a new request runs to completion on the freed slot.
        return await collect(engine, tokenizer.encode("Hello"), SamplingParams(max_new_tokens=3, temperature=0))

    tokens, _ = asyncio.run(main())
    assert len(tokens) <= 3
    assert len(engine.sampler) == 0


def test_admission_is_bounded_and_released(engine, loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode("Hello")

    async def main():
        held = [engine.submit(ids, SamplingParams(max_new_tokens=50, temperature=0)) for _ in range(6)]  # 4 + 2
        with pytest.raises(EngineOverloaded):
            engine.submit(ids, SamplingParams(max_new_tokens=5, temperature=0))
        for generation in held:
            await generation.aclose()
        assert engine.admitted == 0
        return await collect(engine, ids, SamplingParams(max_new_tokens=2, temperature=0))

    tokens, _ = asyncio.run(main())
    assert len(tokens) <= 2


def test_rejects_more_than_the_context(engine):
    with pytest.raises(ValueError):
        engine.submit([1] * 500, SamplingParams(max_new_tokens=20))


async def collect_logprobs(engine: BuiltinEngine, ids: list[int], params: SamplingParams):
    tokens, logprobs = [], []
    async for step in engine.submit(ids, params):
        tokens += step.token_ids
        logprobs += step.logprobs or []
    return tokens, logprobs


def _reference_logprobs(model, ids: list[int], tokens: list[int], bias: dict[int, float] | None = None) -> torch.Tensor:
    """log_softmax of a direct forward pass over prompt + output, one row per generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : len(ids) - 1 + len(tokens)].float()
    for token_id, value in (bias or {}).items():
        logits[:, token_id] += value
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_logprobs_match_a_direct_forward_pass(engine, loaded, temperature):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=5, logprobs=3)
    tokens, logprobs = asyncio.run(collect_logprobs(engine, ids, params))
    assert [e.token_id for e in logprobs] == tokens and tokens
    reference = _reference_logprobs(model, ids, tokens)
    for row, entry in zip(reference, logprobs):
        # Reported before temperature: the model's own distribution, whatever was sampled from it.
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        values, top_ids = row.topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        if temperature == 0:
            assert entry.token_id == top_ids[0].item()


def test_logit_bias_steers_and_is_part_of_the_reported_distribution(engine, loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPTS[0])
    forced = tokenizer.encode(" banana")[0]
    params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=2, logit_bias=((forced, 100.0),))
    tokens, logprobs = asyncio.run(collect_logprobs(engine, ids, params))
    assert tokens == [forced] * 4
    reference = _reference_logprobs(model, ids, tokens, {forced: 100.0})
    assert [e.logprob for e in logprobs] == pytest.approx([row[forced].item() for row in reference], abs=1e-4)
    assert all(e.top[0][0] == forced for e in logprobs)
    # A bias of -100 bans the token the model would pick greedily.
    free, _ = asyncio.run(collect(engine, ids, SamplingParams(max_new_tokens=1, temperature=0)))
    banned, _ = asyncio.run(collect(engine, ids, SamplingParams(max_new_tokens=1, temperature=0,
                                                                logit_bias=((free[0], -100.0),))))
    assert banned and banned[0] != free[0]
