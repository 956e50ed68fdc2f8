"""Per-request sampling over a batch of logits: greedy, temperature, top-k, top-p, penalties."""

from __future__ import annotations

import torch

from server.engine.request import Sequence


def make_generator(seed: int) -> torch.Generator:
    # CPU generator: the same seed gives the same draws whatever device the model runs on.
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """CTRL penalty on every token already seen (prompt and output), as Hugging Face applies it."""
    for row, seq in enumerate(seqs):
        penalty = seq.sampling.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long, device=logits.device)
        scores = logits[row, seen]
        logits[row, seen] = torch.where(scores < 0, scores * penalty, scores / penalty)


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p; returns (probs, token order), both [rows, vocab], sorted."""
    device = logits.device
    temps = torch.tensor([s.sampling.temperature for s in seqs], device=device).unsqueeze(1)
    values, order = torch.sort(logits / temps, dim=-1, descending=True)
    ranks = torch.arange(values.shape[1], device=device).unsqueeze(0)      # [1, vocab]
    top_k = torch.tensor([s.sampling.top_k or values.shape[1] for s in seqs], device=device).unsqueeze(1)
    values = values.masked_fill(ranks >= top_k, float("-inf"))
    top_p = torch.tensor([s.sampling.top_p for s in seqs], device=device).unsqueeze(1)
    probs = torch.softmax(values, dim=-1)
    # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
    cut = (torch.cumsum(probs, dim=-1) - probs) > top_p
    probs = torch.softmax(values.masked_fill(cut, float("-inf")), dim=-1)
    return probs, order


def record_top_logprobs(logprobs: torch.Tensor, seqs: list[Sequence]) -> None:
    """Appends each asking sequence's k most likely tokens at this position to its `top_alternatives`."""
    rows = [i for i, s in enumerate(seqs) if s.top_logprobs > 0]
    if not rows:
        return
    k = min(max(seqs[i].top_logprobs for i in rows), logprobs.shape[1])
    values, ids = torch.topk(logprobs[torch.tensor(rows, device=logprobs.device)], k, dim=-1)
    for row, lps, tokens in zip(rows, values.tolist(), ids.tolist(), strict=True):
        want = seqs[row].top_logprobs
        seqs[row].top_alternatives.append(list(zip(tokens[:want], lps[:want], strict=True)))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
    """logits [num_seqs, vocab] (float32, one row per sequence) -> next token and its logprob.

    Sequences that ask for top logprobs also get this position's alternatives in `top_alternatives`."""
    wanted = any(s.return_logprobs or s.top_logprobs for s in seqs)
    logprobs = torch.log_softmax(logits, dim=-1) if wanted else None
    if logprobs is not None:
        record_top_logprobs(logprobs, seqs)
    apply_repetition_penalty(logits, seqs)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    if rows:
        picked = [seqs[i] for i in rows]
        probs, order = _filtered_probs(logits[torch.tensor(rows, device=logits.device)], picked)
        probs, order = probs.cpu(), order.cpu()
        for j, (row, seq) in enumerate(zip(rows, picked, strict=True)):
            choice = torch.multinomial(probs[j], 1, generator=seq.generator)
            tokens[row] = order[j, choice]
    token_list = tokens.tolist()
    if logprobs is None:
        return token_list, [None] * len(seqs)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    return token_list, [lp if s.return_logprobs else None for lp, s in zip(chosen, seqs, strict=True)]
