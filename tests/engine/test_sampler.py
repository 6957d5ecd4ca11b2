"""The sampler alone: a request whose logits blew up (NaN / Inf) still gets a token, and the
other requests of its step are untouched."""

import torch

from inlaid.engine.sampler import make_generator, sample
from inlaid.engine.sequence import SamplingParams


def test_non_finite_logits_fall_back_without_failing_the_step():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab)
    logits[1] = float("nan")  # every entry: no probability mass at all
    logits[2, :10] = float("nan")  # some entries: sampled among the finite rest
    logits[2, 10:] = -30.0
    logits[2, 17] = 5.0
    logits[3, 5] = float("inf")
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.8, seed=2),
              SamplingParams(temperature=0.8, top_p=0.5, seed=3), SamplingParams(temperature=0.8, seed=4)]
    gens = [make_generator(p.seed, logits.device) for p in params]
    tokens = sample(logits, params, gens).fetch()[0]
    assert all(0 <= t < vocab for t in tokens)
    assert tokens[1] == 0  # no finite logit: the first index, deterministically
    assert tokens[2] == 17  # top_p 0.5 keeps only the dominant finite token
    assert tokens[3] == 5  # an infinite logit: that token
    # the healthy row samples exactly as it would alone (its own generator)
    alone = sample(logits[:1].clone(), params[:1], [make_generator(1, logits.device)]).fetch()[0]
    assert tokens[0] == alone[0]
