"""The attention layer's key/value cache (hst/attention.py)."""

import pytest
import torch

from hst.attention import Attention, KVCache, rope_tables


def test_a_sequence_run_in_pieces_through_the_cache_equals_one_causal_pass(tiny_cfg):
    torch.manual_seed(0)
    attn = Attention(tiny_cfg).eval()
    cos, sin = rope_tables(tiny_cfg.seq_len, tiny_cfg.d_model // tiny_cfg.n_head)
    x = torch.randn(3, tiny_cfg.seq_len, tiny_cfg.d_model)
    whole = attn(x, cos, sin)
    cache, out = KVCache(), []
    for start, end in ((0, 5), (5, 6), (6, 20), (20, tiny_cfg.seq_len)):
        out.append(attn(x[:, start:end], cos, sin, cache))
    assert cache.length == tiny_cfg.seq_len
    torch.testing.assert_close(torch.cat(out, 1), whole, rtol=1e-5, atol=1e-6)
    # The buffers hold seq_len positions from the first piece on: later pieces copy only themselves.
    assert cache.k.shape[2] == tiny_cfg.seq_len


def test_rows_and_join_keep_each_sequence_with_its_own_keys_and_values(tiny_cfg):
    torch.manual_seed(0)
    attn = Attention(tiny_cfg).eval()
    cos, sin = rope_tables(tiny_cfg.seq_len, tiny_cfg.d_model // tiny_cfg.n_head)
    x = torch.randn(4, 10, tiny_cfg.d_model)
    cache = KVCache()
    attn(x[:, :6], cos, sin, cache)
    # Rows 3 and 1, then rows 0 and 2, joined back in that order, continue as those sequences would.
    kept = KVCache.join([cache.rows(torch.tensor([3, 1])), cache.rows(torch.tensor([False, False, True, False]))])
    order = torch.tensor([3, 1, 2])
    torch.testing.assert_close(attn(x[order, 6:], cos, sin, kept), attn(x[order], cos, sin)[:, 6:],
                               rtol=1e-5, atol=1e-6)
    longer = KVCache()
    attn(x[:, :7], cos, sin, longer)
    with pytest.raises(ValueError, match="different numbers of positions"):
        KVCache.join([cache, longer])
