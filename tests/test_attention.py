"""Chapter 1's attention against PyTorch's own implementations (independent reference)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nbsupport import attention as att


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _random_mask(batch, q, k, full):
    mask = torch.rand(batch, q, k) > 0.4 if full else torch.rand(batch, k) > 0.4
    mask[..., 0] = True  # at least one key per row
    return mask


@pytest.mark.parametrize("full_mask", [None, False, True])
def test_scaled_dot_product_matches_torch(full_mask):
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 6, 8), torch.randn(3, 6, 5)
    mask = None if full_mask is None else _random_mask(3, 4, 6, full_mask)
    out, w = att.scaled_dot_product_attention(q, k, v, mask)
    ref_mask = None if mask is None else (mask if full_mask else mask[:, None, :])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4))
    if mask is not None:
        expanded = mask if full_mask else mask[:, None, :].expand(3, 4, 6)
        assert (w[~expanded] == 0).all(), "masked keys must get exactly zero weight"


def test_scaled_dot_product_hand_computed():
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[[2.0], [4.0]]])
    out, w = att.scaled_dot_product_attention(q, k, v)
    e = math.exp(1 / math.sqrt(2))
    torch.testing.assert_close(w, torch.tensor([[[e / (e + 1), 1 / (e + 1)]]]))
    torch.testing.assert_close(out, torch.tensor([[[(2 * e + 4) / (e + 1)]]]))


def test_fully_masked_row_gives_zeros_not_nan():
    q, k, v = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[1, 2] = False  # one query row with no key
    out, w = att.scaled_dot_product_attention(q, k, v, mask)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert (w[1, 2] == 0).all() and (out[1, 2] == 0).all()
    out.sum().backward()
    assert not torch.isnan(q.grad).any()


@pytest.mark.parametrize("use_mask", [False, True])
def test_multihead_matches_torch(use_mask):
    dim, heads = 16, 4
    ours = att.MultiHeadAttention(dim, heads).eval()
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    query, key = torch.randn(2, 5, dim), torch.randn(2, 7, dim)
    mask = _random_mask(2, 5, 7, False) if use_mask else None
    out = ours(query, key, key, mask)
    ref_out, ref_w = ref(query, key, key, key_padding_mask=None if mask is None else ~mask,
                         average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weights, ref_w, atol=1e-5, rtol=1e-5)


def test_additive_attention_hand_computed_and_mask():
    q = torch.tensor([[0.5, -0.5]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    v = torch.tensor([[[1.0], [2.0], [3.0]]])
    out, w = att.additive_attention(q, k, v)
    scores = torch.tanh(q[:, None] + k).sum(-1)
    torch.testing.assert_close(w, torch.softmax(scores, -1))
    torch.testing.assert_close(out, (torch.softmax(scores, -1)[..., None] * v).sum(1))
    out, w = att.additive_attention(q, k, v, mask=torch.tensor([[True, False, True]]))
    assert w[0, 1] == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(1))


def test_learned_additive_attention_gradients_flow():
    layer = att.AdditiveAttention(query_dim=6, key_dim=4, hidden=8)
    query, keys = torch.randn(3, 6, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)
    out, w = layer(query, keys)
    assert out.shape == (3, 4) and w.shape == (3, 5)
    out.pow(2).sum().backward()
    for t in [query, keys, layer.w_query.weight, layer.w_key.weight, layer.v.weight]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_encoder_block_matches_torch_post_ln_layer():
    dim, heads, ff = 16, 4, 32
    ours = att.TransformerEncoderBlock(dim, heads, ff).eval()
    ref = torch.nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=False).eval()
    with torch.no_grad():
        a = ours.attention
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
        ref.linear1.load_state_dict(ours.ff.net[0].state_dict())
        ref.linear2.load_state_dict(ours.ff.net[3].state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(2, 6, dim)
    mask = att.key_padding_mask(torch.tensor([6, 4]), 6)
    out = ours(x, mask)
    ref_out = ref(x, src_key_padding_mask=~mask)
    torch.testing.assert_close(out[0], ref_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :4], ref_out[1, :4], atol=1e-5, rtol=1e-5)


def test_encoder_block_gradients_flow_and_padding_ignored():
    block = att.TransformerEncoderBlock(8, 2, 16).eval()
    x = torch.randn(2, 5, 8, requires_grad=True)
    mask = att.key_padding_mask(torch.tensor([5, 3]), 5)
    y = block(x, mask)
    x2 = x.detach().clone()
    x2[1, 3:] = 1e3
    torch.testing.assert_close(block(x2, mask)[1, :3], y[1, :3].detach(), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_pretrained_heads_reproduced():
    """Our MHA with a MiniLM layer's projections gives the attention weights that the transformers
    library itself returns (``output_attentions``, its eager implementation) for that layer."""
    from nbsupport.models import pretrained

    tokens, ours, library = pretrained.reproduce_heads("a short happy sentence", layer=1)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert ours.shape == library.shape == (12, len(tokens), len(tokens))  # all-MiniLM-L6-v2: 12 heads
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(library), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_sites,score_bias", [(7, False), (3000, True)])  # one chunk, three chunks
def test_site_scores_match_the_composed_layers_values_and_gradients(n_sites, score_bias):
    """MESM's packed-site scores (chunked, recomputed in backward, NumPy tanh) against the same
    formula written with PyTorch's layers: scores and the gradients of every input and parameter."""
    layer = att.AdditiveAttention(query_dim=6, key_dim=5, hidden=9, score_bias=score_bias)
    frame = torch.sort(torch.randint(0, 4, (n_sites,))).values
    query, keys = torch.randn(4, 6, requires_grad=True), torch.randn(n_sites, 5, requires_grad=True)
    params = [query, keys, *layer.parameters()]
    weights = torch.randn(n_sites)

    def grads(scores):
        return torch.autograd.grad((scores * weights).sum(), params)

    got = layer(query, keys, frame=frame)
    ref = layer.v(torch.tanh(layer.w_query(query)[frame] + layer.w_key(keys))).squeeze(1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads(got), grads(ref)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # the dense additive attention's softmax over one frame's sites is the softmax of these scores
    f0 = frame == 0
    _, w = layer(query[:1], keys[f0][None])
    torch.testing.assert_close(w[0], torch.softmax(got[f0], 0), atol=1e-6, rtol=1e-5)


def test_site_scores_shape_errors_name_the_parameters():
    layer = att.AdditiveAttention(query_dim=6, key_dim=5, hidden=9)
    with pytest.raises(ValueError, match="'keys' must be"):
        layer(torch.randn(2, 6), torch.randn(2, 3, 5), frame=torch.zeros(2, dtype=torch.long))
