"""Per-request sampling rules, row by row (no model needed)."""

from __future__ import annotations

import torch

from server.engine.base import SamplingParams
from server.engine.sampling import PerRequestSampler, _RequestSampler


def test_openai_penalties_are_additive_over_generated_tokens():
    row = torch.zeros(10)
    out = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=0, presence_penalty=0.5, frequency_penalty=1.0)).process(
        row, [5, 5, 7]
    )
    assert out[5].item() == -2.5 and out[7].item() == -1.5 and out[0].item() == 0


def test_forced_choices_walk_a_token_trie_then_release():
    sampler = _RequestSampler(SamplingParams(max_new_tokens=1, temperature=0, forced_choices=((1, 2, 3), (1, 4))))
    assert sampler.allowed([]) == [1]
    assert sampler.allowed([1]) == [2, 4]
    assert sampler.allowed([1, 4]) is None  # a choice is complete: free from here
    out = sampler.process(torch.zeros(6), [1])
    assert torch.isinf(out[[0, 1, 3, 5]]).all() and out[2] == 0 and out[4] == 0


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
