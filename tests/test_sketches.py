import torch

from hst import data, paths, sketches
from project import corpus_records

ENGLISH = data.encode(["the quick brown fox jumps over the lazy dog and then the cat sat on the mat " * 8])
NUMBERS = data.encode(["0123 4567 89 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 " * 8])


def test_a_sketch_is_a_distribution_per_context_prefers_its_own_text_and_path_0_scores_its_best():
    english, numbers = sketches.fit_sketch(ENGLISH), sketches.fit_sketch(NUMBERS)
    both = sketches.stack([english, numbers])
    assert sketches.sketch_bytes(both).tolist() == [len(ENGLISH), len(NUMBERS)]
    for context in ("the", "zq", "", "7 8 9"):  # seen, unseen and empty contexts: every next byte sums to 1
        ctx = data.encode([context]).long()
        nexts = torch.cat([ctx.expand(256, -1), torch.arange(256)[:, None]], 1)  # (256, len + 1)
        assert torch.allclose(sketches.byte_logp(nexts, both)[:, -1].exp().sum(0), torch.ones(2), atol=1e-5), context
    text = torch.stack([ENGLISH[:64], NUMBERS[:64]]).long()
    scores = paths.sketch_scores(text, both, 2)  # (2, 64, 2): one sketch per path
    assert scores.shape == (2, 64, 2) and scores[:, -1].argmax(-1).tolist() == [0, 1]
    # Causal: a position's score does not see later bytes.
    changed = text.clone()
    changed[:, 40:] = 7
    assert torch.equal(paths.sketch_scores(changed, both, 2)[:, :40], scores[:, :40])
    # Path 0 holding both sketches (one per domain) scores as the better one on each text.
    one = paths.sketch_scores(text, sketches.stack([english, numbers, numbers]), 2)
    assert torch.equal(one[..., 0], scores.max(-1).values) and torch.equal(one[..., 1], scores[..., 1])


def test_a_drop_goes_to_the_path_of_its_domain_and_an_unseen_domain_is_novel():
    def sketch(domain):
        return sketches.fit_sketch(torch.cat(corpus_records(domain, 120)))
    grown = sketches.stack([sketch("kjv"), sketch("german")])  # two grown paths (path 0's python is not one)
    repeat = sketches.assign(grown, corpus_records("german", 60, skip=120))
    assert repeat.path.count(2) >= 55 and set(repeat.best) == {2}
    assert sum(g <= 0 for g in repeat.gap) == repeat.path.count(2)
    # Path 0 is the trunk: text only it explains (python, its domain) is novel to the grown paths.
    for domain in ("manpages", "python"):
        unseen = sketches.assign(grown, corpus_records(domain, 60, skip=120))
        assert unseen.path.count(sketches.NOVEL) >= 50, domain
    # Without a grown path, or without a second record to hold out, every record is novel.
    assert set(sketches.assign(sketches.stack([]), corpus_records("german", 4)).path) == {sketches.NOVEL}
    assert sketches.assign(grown, corpus_records("german", 1)).path == [sketches.NOVEL]
