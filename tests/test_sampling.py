"""Per-request sampling rules, row by row (no model needed)."""

from __future__ import annotations

import pytest
import torch

from server.engine.base import SamplingParams
from server.engine.sampling import MIN_LOGPROB, PerRequestSampler, _RequestSampler


def test_openai_penalties_are_additive_over_generated_tokens():
    row = torch.zeros(10)
    out = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=0, presence_penalty=0.5, frequency_penalty=1.0)).process(
        row, [5, 5, 7]
    )
    assert out[5].item() == -2.5 and out[7].item() == -1.5 and out[0].item() == 0


def test_sampling_returns_a_one_hot_row_reproducible_by_seed():
    row = torch.randn(50, generator=torch.Generator().manual_seed(0))
    picks = [
        _RequestSampler(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9, seed=7)).process(row, []).argmax().item()
        for _ in range(2)
    ]
    assert picks[0] == picks[1]
    out = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=1.0, seed=7)).process(row, [])
    assert (out == 0).sum() == 1 and torch.isinf(out).sum() == 49


def test_top_p_keeps_only_the_nucleus():
    row = torch.tensor([10.0, 0.0, 0.0, 0.0])  # token 0 holds ~99.99% of the mass
    for seed in range(20):
        out = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.5, seed=seed)).process(row, [])
        assert out.argmax().item() == 0


def test_plain_greedy_requests_are_not_tracked():
    sampler = PerRequestSampler()
    sampler.register("a", SamplingParams(max_new_tokens=1, temperature=0))
    sampler.register("b", SamplingParams(max_new_tokens=1, temperature=0.5))
    assert len(sampler) == 1
    sampler.forget("b")
    assert len(sampler) == 0


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    row = probs.log()
    sampler = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=1.0, seed=3))
    counts = torch.bincount(torch.tensor([sampler.process(row, []).argmax().item() for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, probs, atol=0.04)


def test_logit_bias_is_additive_and_logprobs_are_recorded_before_temperature():
    row = torch.tensor([1.0, 2.0, 3.0, 0.0])
    sampler = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=0, logit_bias=((0, 5.0), (2, -1.0)), logprobs=2))
    out = sampler.process(row, [])
    assert out.tolist() == [6.0, 2.0, 2.0, 0.0]
    expected = torch.log_softmax(out, -1)
    (entry,) = sampler.logprobs
    assert entry.token_id == 0 and entry.logprob == pytest.approx(expected[0].item())
    assert [t for t, _ in entry.top] == [0, 1] or [t for t, _ in entry.top] == [0, 2]
    hot = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=1.7, seed=1, logprobs=0))
    token = hot.process(row, []).argmax().item()
    (entry,) = hot.logprobs
    assert entry.token_id == token and entry.top == ()
    assert entry.logprob == pytest.approx(torch.log_softmax(row, -1)[token].item())


def test_masked_tokens_report_openai_minimum_not_infinity():
    sampler = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=0, logprobs=3))
    sampler.mask = torch.tensor([False, True, False, False])  # what a grammar allows this step
    sampler.process(torch.zeros(4), [])
    (entry,) = sampler.logprobs
    assert entry.token_id == 1 and entry.logprob == pytest.approx(0.0)
    assert [v for _, v in entry.top[1:]] == [MIN_LOGPROB, MIN_LOGPROB]


def test_take_logprobs_hands_over_in_order():
    sampler = PerRequestSampler()
    sampler.register("a", SamplingParams(max_new_tokens=3, temperature=0, logprobs=0))
    inner = sampler._samplers["a"]
    for value in (0, 1, 2):
        inner.process(torch.eye(3)[value] * 5, [])
    assert [e.token_id for e in sampler.take_logprobs("a", 2)] == [0, 1]
    assert [e.token_id for e in sampler.take_logprobs("a", 5)] == [2]
