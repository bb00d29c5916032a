"""Tests of the Chapter 7 two-phase baselines (nbsupport.models.baselines) against independent references."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.models import baselines as bl

DIMS = {"L": 12, "A": 7, "V": 9}
KEYS = {"L": "text", "A": "audio", "V": "video"}
SMALL = {"LF-LSTM": dict(hidden=8), "LF-Transformer": dict(dim=8, layers=1, heads=2),
         "MulT": dict(dim=8, heads=2, cross_layers=1, self_layers=1)}


def make_batch(b=4, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or {"L": [5, 3, 1, 4][:b], "A": [6, 2, 4, 5][:b], "V": [3, 3, 2, 1][:b]}
    batch = {"emotion": (torch.rand(b, 6, generator=g) > 0.5).float(), "sentiment": torch.zeros(b)}
    for m, key in KEYS.items():
        n = max(lengths[m])
        mask = torch.arange(n)[None, :] < torch.tensor(lengths[m])[:, None]
        x = torch.randn(b, n, DIMS[m], generator=g) * 3 + 1
        batch[key] = torch.where(mask[..., None], x, torch.zeros_like(x))
        batch[f"{key}_mask"] = mask
    return batch


def with_garbage(batch, extra=3, seed=1):
    """Same utterances with garbage in the existing padding and ``extra`` more padded steps of garbage."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for key in KEYS.values():
        x, mask = batch[key], batch[f"{key}_mask"]
        b, n, d = x.shape
        big = torch.cat([x, torch.zeros(b, extra, d)], 1)
        big_mask = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
        noise = torch.randn(b, n + extra, d, generator=g) * 100
        out[key] = torch.where(big_mask[..., None], big, noise)
        out[f"{key}_mask"] = big_mask
    return out


def build(name, modalities="LAV", seed=0):
    torch.manual_seed(seed)
    return bl.build_baseline(name, modalities, DIMS, 6, dropout=0.0, **SMALL[name]).eval()


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_padding_does_not_change_outputs(name):
    model = build(name)
    batch = make_batch()
    with torch.no_grad():
        ref = model(batch)
        got = model(with_garbage(batch))
    assert ref.shape == (4, 6)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_batch_item_equals_single_item(name):
    """An utterance's logits do not depend on the other utterances it is batched with (and their lengths)."""
    model = build(name)
    batch = make_batch()
    with torch.no_grad():
        full = model(batch)
        for i in range(4):
            one = {}
            for key in KEYS.values():
                n = int(batch[f"{key}_mask"][i].sum())
                one[key] = batch[key][i:i + 1, :n]
                one[f"{key}_mask"] = batch[f"{key}_mask"][i:i + 1, :n]
            torch.testing.assert_close(model(one), full[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,modalities", list(itertools.product(bl.BASELINES, ["L", "A", "V", "LA", "AV", "LV", "LAV"])))
def test_modality_subsets_shapes_and_only_needed_keys(name, modalities):
    model = build(name, modalities)
    batch = make_batch()
    for m, key in KEYS.items():  # absent modalities are absent from the batch too
        if m not in modalities:
            del batch[key], batch[f"{key}_mask"]
    out = model(batch)
    assert out.shape == (4, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_overfits_a_tiny_batch(name):
    model = build(name).train()
    batch = make_batch(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(80):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["emotion"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = (model(batch) > 0).float()
    assert loss.item() < 0.05
    assert torch.equal(pred, batch["emotion"])


def test_crossmodal_block_matches_torch_multihead_attention():
    """MulT's crossmodal layer = pre-LN residual attention of torch.nn.MultiheadAttention with copied
    weights (key_padding_mask on the source) + pre-LN residual feed-forward."""
    torch.manual_seed(0)
    dim, heads = 8, 2
    block = bl.CrossmodalBlock(dim, heads, ff_size=16).eval()
    for ln in (block.norm_q, block.norm_kv, block.norm_ff):  # non-trivial affine LayerNorms
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    target, source = torch.randn(3, 5, dim), torch.randn(3, 4, dim)
    src_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)

    ref_mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    a = block.attention
    with torch.no_grad():
        ref_mha.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref_mha.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref_mha.out_proj.weight.copy_(a.out_proj.weight)
        ref_mha.out_proj.bias.copy_(a.out_proj.bias)

        q = F.layer_norm(target, (dim,), block.norm_q.weight, block.norm_q.bias)
        kv = F.layer_norm(source, (dim,), block.norm_kv.weight, block.norm_kv.bias)
        z = target + ref_mha(q, kv, kv, key_padding_mask=~src_mask, need_weights=False)[0]
        lin1, lin2 = block.ff.net[0], block.ff.net[3]
        h = F.layer_norm(z, (dim,), block.norm_ff.weight, block.norm_ff.bias)
        ref = z + F.linear(F.relu(F.linear(h, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)

        got = block(target, torch.ones(3, 5, dtype=torch.bool), source, src_mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_lstm_encoder_matches_unpadded_torch_lstm():
    """LF-LSTM's modality vector = [last forward state; first-step backward state] of torch's LSTM run on
    the unpadded sequence alone."""
    model = build("LF-LSTM", "A")
    batch = make_batch()
    with torch.no_grad():
        vec = model.encode(batch, "A")
        lstm = model.lstms["A"]
        for i in range(4):
            n = int(batch["audio_mask"][i].sum())
            x = batch["audio"][i:i + 1, :n]
            out, _ = lstm(x)  # (1, n, 2H): forward half at t=n-1, backward half at t=0
            h = lstm.hidden_size
            torch.testing.assert_close(vec[i], torch.cat([out[0, -1, :h], out[0, 0, h:]]), atol=1e-5, rtol=1e-5)


def test_masked_mean_and_input_stats():
    x = torch.tensor([[[1.0], [3.0], [float("nan")]], [[2.0], [float("inf")], [7.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(bl.masked_mean(x, mask), torch.tensor([[2.0], [2.0]]))
    model = build("LF-LSTM", "A")
    batch = make_batch()
    model.fit_input_stats([batch])
    real = batch["audio"][batch["audio_mask"]]
    torch.testing.assert_close(model.mean_A, real.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.std_A, real.std(0, unbiased=False), atol=1e-5, rtol=1e-5)


def test_lstm_macs_formula_matches_hand_count():
    lstm = nn.LSTM(3, 5, bidirectional=True, num_layers=2)
    # layer 0: 2 dirs * 4 gates * 5 * (3 + 5); layer 1: 2 * 4 * 5 * (10 + 5); per step
    assert bl._lstm_macs(lstm, 7) == 7 * (2 * 4 * 5 * 8 + 2 * 4 * 5 * 15)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="modalities"):
        bl.LFLSTM("LX", DIMS)
    with pytest.raises(ValueError, match="input_dims"):
        bl.MulT("LAV", {"L": 3})
    with pytest.raises(ValueError, match="name"):
        bl.build_baseline("GRU", "L", DIMS)
    model = build("LF-Transformer", "LA")
    batch = make_batch()
    del batch["audio_mask"]
    with pytest.raises(KeyError, match="audio_mask"):
        model(batch)
    batch = make_batch()
    batch["text"] = batch["text"][..., :5]
    with pytest.raises(ValueError, match="text"):
        model(batch)


# ---------------------------------------------- MulT: the authors' MULTModel as a preset, each difference a switch
def test_mult_reference_parameter_count_from_layer_sizes():
    # MULTModel with main.py's defaults on CMU-MOSEI's features (GloVe 300, COVAREP 74, FACET 35), 1 output
    d, heads, layers, dims, n_out = 30, 5, 5, {"L": 300, "A": 74, "V": 35}, 1

    def layer(w):  # attention (q, k, v, out with biases) + one shared LayerNorm + LN_ff + fc1 w->4w + fc2
        return 4 * (w * w + w) + 2 * w + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)

    proj = d * sum(dims.values())  # Conv1d(k=1) without bias
    cross = 6 * (layers * layer(d) + 2 * d)  # six directions, final LayerNorm each
    mem = 3 * (max(layers, 3) * layer(2 * d) + 2 * 2 * d)  # one self-attention transformer per target, width 2d
    head = 2 * (6 * d * 6 * d + 6 * d) + (6 * d * n_out + n_out)  # proj1, proj2, out_layer on 3 * 2d
    expected = proj + cross + mem + head
    assert expected == 1_073_731
    ref = bl.MulT("LAV", dims, n_out, **bl.MULT_REFERENCE)
    assert sum(p.numel() for p in ref.parameters()) == expected
    # the book's switches at the same sizes: separate key/value LayerNorms and projection biases
    book = bl.MulT("LAV", dims, n_out, dim=d, heads=heads, cross_layers=layers, self_layers=max(layers, 3))
    assert sum(p.numel() for p in book.parameters()) == expected + 6 * layers * 2 * d + 3 * d


def test_fairseq_positions_by_hand():
    x = torch.ones(1, 3, 4)
    x[0, 2, 0] = 0.0  # first feature exactly 0: the reference reads it as padding
    pe = bl.fairseq_positions(x)[0]
    # width 4: half 2, frequencies exp(-i * ln(10000) / (2 - 1)) = 1, 1e-4; positions start at 1
    for p in (1, 2):
        expected = torch.tensor([math.sin(p), math.sin(p * 1e-4), math.cos(p), math.cos(p * 1e-4)])
        assert torch.allclose(pe[p - 1], expected, atol=1e-6)
    assert torch.equal(pe[2], torch.zeros(4))


def test_mult_reference_switches_by_hand():
    torch.manual_seed(0)
    m = bl.MulT("LA", {"L": 3, "A": 2}, 2, dim=4, heads=2, cross_layers=1, self_layers=1, entry="reference",
                mask_padding=False, future_mask=True, pooling="last")
    x = torch.randn(2, 5, 4)
    assert torch.allclose(m._enter(x), 2.0 * x + bl.fairseq_positions(x))  # sqrt(4) x + positions
    q_mask, k_mask = torch.ones(2, 2, dtype=torch.bool), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    allowed = m._attn_mask(q_mask, k_mask)[0]
    # query i sees keys j < i + 1 + |4 - 2| = i + 3; padding is not masked
    assert allowed.tolist() == [[True, True, True, False], [True, True, True, True]]
    m.mask_padding = True
    assert m._attn_mask(q_mask, k_mask)[1].tolist() == [[True, True, False, False], [True, True, False, False]]
    m.future_mask = False
    assert m._attn_mask(q_mask, k_mask) is None  # the book's key-padding mask
    m2 = bl.MulT("LA", {"L": 3, "A": 2}, 2, dim=4, heads=2, cross_layers=1, self_layers=1)
    assert any("norm_kv" in n for n, _ in m2.cross.named_parameters())  # the book: separate LayerNorms
    assert all(p.bias is not None for p in m2.proj.values())
    shared = bl.CrossmodalBlock(4, 2, kv_norm="shared")
    assert shared.norm_kv is None and sum(p.numel() for p in shared.parameters()) == \
        sum(p.numel() for p in bl.CrossmodalBlock(4, 2).parameters()) - 8
    assert not any("norm_kv" in n for n, _ in m2.self_attn.named_parameters())  # no unused LayerNorm
    with pytest.raises(ValueError, match="pooling"):
        bl.MulT("LA", {"L": 3, "A": 2}, 2, dim=4, heads=2, pooling="first")


# ---------------------------------------------- LF-LSTM: MESM's lf_rnn.py as a preset
def test_lf_lstm_reference_parameter_count_from_layer_sizes():
    dims, n_out = {"L": 300, "A": 144, "V": 35}, 6  # MESM's hand-crafted feature sizes (hfc_sizes)

    def bilstm(d, h):  # two directions: 4 gates, input and recurrent weights, two biases
        return 2 * (4 * h * (d + h) + 2 * 4 * h)

    def head(h):  # Linear(2h, h) -> ReLU -> Linear(h, 6)
        return (2 * h * h + h) + (h * n_out + n_out)

    expected = sum(bilstm(d, d) + head(d) for d in dims.values()) + 3  # + Linear(3, 1) fusion, no bias
    assert expected == 2_026_336
    model = bl.LFLSTM("LAV", dims, n_out, **bl.LF_LSTM_REFERENCE)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_lf_lstm_padded_readout_and_logit_fusion_by_hand():
    torch.manual_seed(0)
    model = bl.LFLSTM("LA", {"L": 3, "A": 2}, 2, **bl.LF_LSTM_REFERENCE).eval()
    batch = {k: v for k, v in make_batch(b=2, lengths={"L": [4, 2], "A": [3, 1], "V": [1, 1]}).items()
             if not k.startswith("video")}
    batch["text"], batch["audio"] = batch["text"][..., :3], batch["audio"][..., :2]
    with torch.no_grad():
        out = model(batch)
        x_l = batch["text"] * batch["text_mask"][..., None]  # padding zeroed, then run as a padded batch
        x_a = batch["audio"] * batch["audio_mask"][..., None]
        y_l, _ = model.lstms["L"](x_l)
        _, (h_a, _) = model.lstms["A"](x_a)
        # text: the output at the last *padded* step; audio: the final states after the padding
        logits = torch.stack([model.head.heads["L"](y_l[:, -1]), model.head.heads["A"](torch.cat([h_a[0], h_a[1]], -1))], -1)
        expected = logits @ model.head.weighted_fusion.weight[0]
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="fusion='logits'"):
        bl.LFLSTM("LA", {"L": 3, "A": 2}, 2, hidden="features")


# ---------------------------------------------- LF-Transformer: MESM's lf_transformer.py as a preset
def test_lf_transformer_reference_parameter_count_from_layer_sizes():
    dims, n_out, layers, ff = {"L": 300, "A": 144, "V": 35}, 6, 2, 2048

    def layer(d):  # PyTorch's encoder layer: attention (q, k, v, out with biases), d->2048->d, two LayerNorms
        return 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d

    def head(d):  # Linear(d, d // 2) -> ReLU -> Linear(d // 2, 6)
        return (d * (d // 2) + d // 2) + (d // 2 * n_out + n_out)

    expected = sum(layers * layer(d) + d + head(d) for d in dims.values()) + 3  # + CLS vectors, Linear(3, 1)
    assert expected == 4_898_702
    model = bl.LFTransformer("LAV", dims, n_out, **bl.LF_TRANSFORMER_REFERENCE)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_lf_transformer_reference_reads_the_cls_and_lets_text_see_padding():
    torch.manual_seed(0)
    model = bl.LFTransformer("LA", {"L": 4, "A": 2}, 2, dim="features", layers=1, heads={"L": 2, "A": 1},
                             ff_size=8, positions="none", pooling="cls", text_mask=False, fusion="logits",
                             dropout=0.0).eval()
    batch = {k: v for k, v in make_batch(b=2, lengths={"L": [4, 2], "A": [3, 1], "V": [1, 1]}).items()
             if not k.startswith("video")}
    batch["text"], batch["audio"] = batch["text"][..., :4], batch["audio"][..., :2]
    with torch.no_grad():
        out = model(batch)
        # by hand: CLS prepended, the text block sees every position, audio's padding is masked
        x_l = torch.cat([model.cls["L"].expand(2, 1, 4), batch["text"] * batch["text_mask"][..., None]], 1)
        x_a = torch.cat([model.cls["A"].expand(2, 1, 2), batch["audio"] * batch["audio_mask"][..., None]], 1)
        keep_a = torch.cat([torch.ones(2, 1, dtype=torch.bool), batch["audio_mask"]], 1)
        h_l = model.encoders["L"][0](x_l, None)[:, 0]
        h_a = model.encoders["A"][0](x_a, keep_a)[:, 0]
        logits = torch.stack([model.head.heads["L"](h_l), model.head.heads["A"](h_a)], -1)
    assert torch.allclose(out, logits @ model.head.weighted_fusion.weight[0], atol=1e-6)
    with pytest.raises(ValueError, match="fusion='logits'"):
        bl.LFTransformer("LA", {"L": 4, "A": 2}, 2, dim="features")
