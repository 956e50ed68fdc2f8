"""Sampling: greedy, top-k/top-p filtering, seeded draws, repetition penalty as Hugging Face does it."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from server.engine.request import SamplingParams, Sequence, StoppingParams
from server.engine.sampler import make_generator, sample


def _seq(sampling: SamplingParams, ids=(1, 2, 3), logprobs=False) -> Sequence:
    seq = Sequence(request_id="r", prompt_ids=list(ids), sampling=sampling, stopping=StoppingParams(4), seed=7,
                   adapter_id="", return_logprobs=logprobs, sink=lambda o: None, arrival=0.0)
    if not sampling.greedy:
        seq.generator = make_generator(sampling.seed or 0)
    return seq


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(SamplingParams(), logprobs=True) for _ in range(3)]
    tokens, logprobs = sample(logits.clone(), seqs)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs), expected)


def test_top_k_one_is_greedy_and_seeds_reproduce():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    top1 = _seq(SamplingParams(temperature=2.0, top_k=1, seed=3))
    assert sample(logits.clone(), [top1])[0] == logits.argmax(-1).tolist()
    draws = [[sample(logits.clone(), [s])[0][0] for _ in range(20)]
             for s in (_seq(SamplingParams(temperature=1.0, seed=5)), _seq(SamplingParams(temperature=1.0, seed=5)))]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seq = _seq(SamplingParams(temperature=1.0, top_p=0.7, seed=11))
    seen = {sample(logits.clone(), [seq])[0][0] for _ in range(200)}
    assert seen == {0, 1}


def test_repetition_penalty_matches_hf():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(2))
    ids = [3, 5, 5, 9, 20]
    processor = RepetitionPenaltyLogitsProcessor(penalty=1.7)
    expected = processor(torch.tensor([ids]), logits.clone())
    seq = _seq(SamplingParams(repetition_penalty=1.7), ids=ids)
    from server.engine.sampler import apply_repetition_penalty

    got = logits.clone()
    apply_repetition_penalty(got, [seq])
    assert torch.allclose(got, expected)
