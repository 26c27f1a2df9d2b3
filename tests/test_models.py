"""Students: shapes, ED routes, masking/causality, and equality with reference formulations."""
import math

import pytest
import torch
from torch import nn

from dllm2rec.config import ModelConfig
from dllm2rec.models import build_student, gather_history, project_llm_table

N, L = 50, 10


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, 3, 10, 7, 2, 10])[:b]
    hist = torch.randint(0, N, (b, L), generator=g)
    hist[torch.arange(L)[None] >= lens[:, None]] = N
    return hist, lens


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "caser"])
@pytest.mark.parametrize("llm_dim", [None, 8, 576])
def test_shapes(name, llm_dim):
    torch.manual_seed(0)
    m = build_student(ModelConfig(name=name), N, llm_dim=llm_dim).eval()
    hist, lens = _batch()
    llm = None if llm_dim is None else gather_history(torch.randn(N, llm_dim), hist)
    h = m.encode(hist, lens, llm)
    assert h.shape == (6, m.out_dim)
    assert m.out_dim == (64 + 48 if name == "caser" else 64)
    assert isinstance(m.output, nn.Linear) and m.output.out_features == N
    assert m(hist, lens, llm).shape == (6, N)
    assert m.embed.item.weight.shape == (N + 1, 64)
    assert torch.isfinite(m(hist, lens, llm)).all()


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "caser"])
def test_ed_routes_agree_and_padding_is_irrelevant(name):
    torch.manual_seed(1)
    m = build_student(ModelConfig(name=name), N, llm_dim=16, ed_weight=0.3).eval()
    table = torch.randn(N, 16)
    hist, lens = _batch()
    a = m.encode(hist, lens, gather_history(table, hist))
    b = m.encode(hist, lens, llm_table=table)
    c = m.encode(hist, lens, llm_hist_projected=gather_history(project_llm_table(m, table), hist))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # the padding row's ID embedding never reaches the state
    with torch.no_grad():
        m.embed.item.weight[N] = 5.0
    torch.testing.assert_close(m.encode(hist, lens, llm_table=table), a, rtol=1e-5, atol=1e-6)


def test_ed_embedding_formula():
    torch.manual_seed(2)
    m = build_student(ModelConfig(name="sasrec"), N, llm_dim=4, ed_weight=0.2)
    table = torch.randn(N, 4)
    hist, _ = _batch()
    e = m.embed(hist, gather_history(table, hist))
    i, j = 1, 0  # a real item
    item = int(hist[i, j])
    expect = m.embed.item.weight[item] + 0.2 * (m.embed.llm_proj.weight @ table[item] + m.embed.llm_proj.bias)
    torch.testing.assert_close(e[i, j], expect)
    torch.testing.assert_close(e[0, 5], m.embed.item.weight[N])  # padding: no projection (not even bias)


def test_ed_without_offset_and_errors():
    m = build_student(ModelConfig(name="gru4rec"), N, llm_dim=8, learnable_offset=False)
    assert m.embed.item is None
    assert not any(p.shape[0] == N + 1 for p in m.parameters())
    hist, lens = _batch()
    assert m.encode(hist, lens, llm_table=torch.randn(N, 8)).shape == (6, 64)
    with pytest.raises(ValueError, match="exactly one"):
        m.encode(hist, lens)
    with pytest.raises(ValueError, match="without ED"):
        build_student(ModelConfig(name="gru4rec"), N).encode(hist, lens, gather_history(torch.randn(N, 8), hist))
    with pytest.raises(ValueError, match="unknown student"):
        build_student(ModelConfig(name="bert"), N)
    with pytest.raises(ValueError, match="shape"):
        m.encode(hist, lens, torch.randn(6, L, 9))


def test_gru4rec_matches_packed_reference():
    torch.manual_seed(3)
    m = build_student(ModelConfig(name="gru4rec"), N).eval()
    hist, lens = _batch()
    emb = m.embed.item(hist)
    packed = nn.utils.rnn.pack_padded_sequence(emb, lens, batch_first=True, enforce_sorted=False)
    _, hn = m.gru(packed)
    torch.testing.assert_close(m.encode(hist, lens), hn[-1], rtol=1e-5, atol=1e-6)


def _reference_sasrec(m, states, len_states):
    """Transcription of the DROS/DLLM2Rec reference forward (one head, eval mode)."""
    H = m.hidden
    seq = m.embed.item(states) + m.positions(torch.arange(states.shape[1]))
    mask = torch.ne(states, N).float().unsqueeze(-1)
    seq = seq * mask
    blk = m.blocks[0]
    queries, keys = blk.ln_q(seq), seq
    att = blk.attn
    Q, K, V = att.q(queries), att.k(keys), att.v(keys)
    out = torch.bmm(Q, K.transpose(1, 2)) / H ** 0.5
    key_mask = torch.sign(torch.abs(keys.sum(-1))).unsqueeze(1).repeat(1, queries.shape[1], 1)
    out = torch.where(key_mask == 0, torch.full_like(out, -2 ** 32 + 1), out)
    tril = torch.tril(torch.ones_like(out[0])).unsqueeze(0).repeat(out.shape[0], 1, 1)
    out = torch.where(tril == 0, torch.full_like(out, -2 ** 32 + 1), out)
    out = torch.softmax(out, -1)
    out = out * mask  # query mask (the id mask; see sasrec.py)
    mh = torch.bmm(out, V) + queries
    x = blk.ln_ff(mh)
    ff = blk.ff
    y = ff.w2(torch.relu(ff.w1(x.transpose(1, 2)))).transpose(1, 2)
    ff_out = ff.norm(y + x) * mask
    ff_out = m.final_norm(ff_out)
    return ff_out[torch.arange(states.shape[0]), len_states - 1]


def test_sasrec_matches_reference_transcription_and_is_causal():
    torch.manual_seed(4)
    m = build_student(ModelConfig(name="sasrec"), N).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hist, lens = _batch()
    h = m.encode(hist, lens)
    torch.testing.assert_close(h, _reference_sasrec(m, hist, lens), rtol=1e-4, atol=1e-5)
    # items after position len-1 are invisible (causal mask), even when they are real items
    hist2 = hist.clone()
    hist2[hist2 == N] = 7
    torch.testing.assert_close(m.encode(hist2, lens), h, rtol=1e-5, atol=1e-6)
    # ... while an earlier item does matter
    hist3 = hist.clone()
    hist3[:, 0] = (hist3[:, 0] + 1) % N
    assert not torch.allclose(m.encode(hist3, lens), h)


def test_caser_structure_and_masking():
    torch.manual_seed(5)
    m = build_student(ModelConfig(name="caser"), N).eval()
    assert [c.kernel_size for c in m.horizontal] == [(2, 64), (3, 64), (4, 64)]
    assert m.vertical.kernel_size == (10, 1)
    hist, lens = _batch()
    x = m.embed.item(hist) * (hist < N).unsqueeze(-1)
    x = x.unsqueeze(1)
    pooled = [torch.relu(c(x)).squeeze(3).max(2).values for c in m.horizontal]
    expect = torch.cat(pooled + [torch.relu(m.vertical(x)).view(-1, 64)], 1)
    torch.testing.assert_close(m.encode(hist, lens), expect)
    with pytest.raises(ValueError, match="max_len"):
        m.encode(hist[:, :5], lens.clamp(max=5))


def test_dropout_only_in_train_mode():
    torch.manual_seed(6)
    m = build_student(ModelConfig(name="sasrec", dropout=0.5), N)
    hist, lens = _batch()
    m.eval()
    torch.testing.assert_close(m.encode(hist, lens), m.encode(hist, lens))
    m.train()
    assert not torch.allclose(m.encode(hist, lens), m.encode(hist, lens))
    assert math.isclose(m.emb_dropout.p, 0.5)


def test_ed_table_route_gradients_match_plain_autograd():
    torch.manual_seed(7)
    m = build_student(ModelConfig(name="gru4rec"), 600, llm_dim=12, ed_weight=0.5).eval()
    table = torch.randn(600, 12)
    g = torch.Generator().manual_seed(8)
    hist = torch.randint(0, 600, (64, L), generator=g)  # > 256 distinct ids: several gather slices
    hist[:5, 4:] = 600
    lens = torch.full((64,), L)
    lens[:5] = 4
    out_t = m.encode(hist, lens, llm_table=table).square().sum()
    gt = torch.autograd.grad(out_t, [m.embed.llm_proj.weight, m.embed.llm_proj.bias])
    out_h = m.encode(hist, lens, gather_history(table, hist)).square().sum()
    gh = torch.autograd.grad(out_h, [m.embed.llm_proj.weight, m.embed.llm_proj.bias])
    torch.testing.assert_close(out_t, out_h)
    for a, b in zip(gt, gh):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
