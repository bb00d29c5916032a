"""Tests of FE2E / MESM (nbsupport.models.mesm, Chapters 5-6) against independent references:
dense PyTorch blocks, hand-computed top-p counts, and the model's own invariances (padding)."""
import math

import pytest
import torch

from nbsupport.models.mesm import EndToEndModel, FE2E, MESM, MesmConfig
from nbsupport.sparse import top_p_mask as top_p_keep

SIZES = dict(stem_channels=4, block_channels=(4, 8, 8), dim=8, layers=1, heads=2, attention_hidden=8, dropout=0.0)


def small(**fields) -> MesmConfig:
    """The tests' small :class:`MesmConfig` (``SIZES``) with ``fields`` changed."""
    return MesmConfig(**{**SIZES, **fields})


def make_batch(b=3, t=3, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    faces_mask = torch.zeros(b, t, dtype=torch.bool)
    mel_mask = torch.zeros(b, p, dtype=torch.bool)
    for i in range(b):
        faces_mask[i, : max(1, t - i)] = True
        mel_mask[i, : max(1, p - i)] = True
    return dict(input_ids=torch.randint(1000, 3000, (b, 6), generator=g),
                attention_mask=torch.ones(b, 6, dtype=torch.long),
                faces=torch.rand(b, t, 48, 48, generator=g), faces_mask=faces_mask,
                mel=torch.randn(b, p, 128, 32, generator=g), mel_mask=mel_mask,
                emotion=(torch.rand(b, 6, generator=g) > 0.5).float())


@pytest.mark.parametrize("modalities", ["L", "LA", "LV", "LAV"])
def test_shapes_every_modality_subset(modalities):
    torch.manual_seed(0)
    model = MESM(modalities, top_p=0.7, config=small(), tiny_text=True)
    out = model(make_batch())
    assert out.shape == (3, 6) and torch.isfinite(out).all()
    assert set(model.last_maps) == set(modalities) - {"L"}
    if "V" in modalities:  # 48x48 face -> 24x24 after the stem -> 12x12 -> 6x6 before the blocks
        assert [tuple(r.kept.shape[1:]) for r in model.last_maps["V"]] == [(24, 24), (12, 12), (6, 6)]
        assert model.last_maps["V"][0].kept.shape[0] == int(make_batch()["faces_mask"].sum())
    if "A" in modalities:  # 128x32 mel piece -> 64x16 -> 32x8 -> 16x4
        assert [tuple(r.kept.shape[1:]) for r in model.last_maps["A"]] == [(64, 16), (32, 8), (16, 4)]
    with torch.no_grad():  # distinct fusion parameters: the weights must be their softmax, in "LAV" order
        model.fusion.copy_(torch.arange(len(modalities), dtype=torch.float32) * 0.7 - 0.4)
    raw = [0.7 * i - 0.4 for i in range(len(modalities))]
    expected = {m: math.exp(r) / sum(math.exp(v) for v in raw) for m, r in zip(modalities, raw)}
    assert model.fusion_weights() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_sparse_blocks_without_attention_equal_fe2e(train):
    """Sparse blocks at full density (no attention, nothing dropped) = FE2E's dense torch conv blocks."""
    torch.manual_seed(1)
    dense = FE2E("LAV", config=small(), tiny_text=True)
    sparse = EndToEndModel("LAV", config=small(attention=False, sparse=True), tiny_text=True)
    sparse.load_state_dict(dense.state_dict())  # shared parameter names
    dense.train(train), sparse.train(train)
    batch = make_batch()
    torch.manual_seed(0)  # the text encoder's dropout draws the same masks in both runs
    out_sparse = sparse(batch)
    torch.manual_seed(0)
    torch.testing.assert_close(out_sparse, dense(batch), atol=1e-4, rtol=1e-4)


def test_mesm_top_p_one_equals_dense_with_attention():
    """MESM with top_p = 1 keeps every site: same outputs as the dense model with the same attention."""
    torch.manual_seed(2)
    mesm = MESM("LAV", top_p=1.0, config=small(), tiny_text=True).eval()
    dense_att = EndToEndModel("LAV", config=small(attention=True, sparse=False), tiny_text=True).eval()
    dense_att.load_state_dict(mesm.state_dict())
    batch = make_batch()
    torch.testing.assert_close(mesm(batch), dense_att(batch), atol=1e-4, rtol=1e-4)
    assert all(r.kept.all() for r in mesm.last_maps["V"])


def test_top_p_keep_hand_made():
    probs = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    # row 0 sorted: 0.5, 0.3, 0.1, 0.1 -> mass 0.5 < 0.7, 0.8 >= 0.7: keep {1, 3}
    assert top_p_keep(probs, 0.7).tolist() == [[False, True, False, True], [True, True, True, False]]
    assert top_p_keep(probs, 0.3).sum(1).tolist() == [1, 2]
    assert top_p_keep(probs, 1.0).all()


def test_uniform_attention_keeps_ceil_p_sites_per_frame():
    """With the score vector v = 0 the attention is uniform over the 24x24 sites, so top-p keeps
    ceil(p * 576) sites in every frame (hand count), and the features are not rescaled."""
    torch.manual_seed(3)
    model = MESM("LV", top_p=0.3, config=small(), tiny_text=True).eval()
    with torch.no_grad():
        for att in model.pathways["V"].cross_attention:
            att.v.weight.zero_()
    model(make_batch())
    rec = model.last_maps["V"][0]
    torch.testing.assert_close(rec.attention.sum((1, 2)), torch.ones(rec.attention.shape[0]))
    assert rec.kept.flatten(1).sum(1).tolist() == [math.ceil(0.3 * 576)] * rec.kept.shape[0]
    # later layers only keep sites that were active after the previous sparse pool
    for r in model.last_maps["V"][1:]:
        assert not (r.kept & ~r.active).any()


def test_padding_frames_do_not_change_outputs():
    torch.manual_seed(4)
    model = MESM("LAV", top_p=0.6, config=small(), tiny_text=True)
    batch = make_batch()
    other = {k: v.clone() for k, v in batch.items()}
    pad = ~other["faces_mask"]
    other["faces"][pad] = torch.rand(int(pad.sum()), 48, 48) * 5
    other["mel"][~other["mel_mask"]] = 7.0
    model.train()  # batch-norm statistics must ignore padding too
    torch.manual_seed(0)
    out = model(batch)
    torch.manual_seed(0)
    torch.testing.assert_close(model(other), out)
    model.eval()  # and an utterance alone (no padding at all) gives its batched output
    full = model(batch)
    alone = {k: v[2:3] for k, v in batch.items()}
    alone["faces"], alone["faces_mask"] = alone["faces"][:, :1], alone["faces_mask"][:, :1]
    alone["mel"], alone["mel_mask"] = alone["mel"][:, :1], alone["mel_mask"][:, :1]
    torch.testing.assert_close(model(alone), full[2:3], atol=1e-5, rtol=1e-5)


def test_gradients_reach_text_encoder_and_attention():
    torch.manual_seed(5)
    model = MESM("LAV", top_p=0.7, config=small(), tiny_text=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(make_batch()), make_batch()["emotion"])
    loss.backward()
    text_grad = sum(p.grad.abs().sum() for p in model.text.parameters() if p.grad is not None)
    assert text_grad > 0
    for att in model.pathways["V"].cross_attention:  # the attention * n_sites modulation passes gradients
        assert att.w_key.weight.grad is not None and att.w_key.weight.grad.abs().sum() > 0
    groups = model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_trains_on_a_tiny_batch():
    torch.manual_seed(6)
    model = MESM("LAV", top_p=0.7, config=small(), tiny_text=True)
    batch = make_batch(b=4)
    opt = torch.optim.Adam(model.param_groups(1e-2))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["emotion"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="modalities"):
        FE2E("AV", config=small(), tiny_text=True)
    with pytest.raises(ValueError, match="top_p"):
        MESM("LV", top_p=1.5, config=small(), tiny_text=True)
    with pytest.raises(ValueError, match="top_p"):  # dropping sites needs the attention that chooses them
        EndToEndModel("LV", config=small(top_p=0.5), tiny_text=True)
    model = MESM("LV", config=small(), tiny_text=True)
    model.top_p = 0.4
    assert model.top_p == 0.4
    with pytest.raises(KeyError, match="faces"):
        model({"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)})
    pathway = model.pathways["V"]  # 513 frames: refused before the CNN runs (no block record is written)
    with pytest.raises(ValueError, match="at most 512 frames"):
        pathway(torch.zeros(1, 513, 48, 48), torch.ones(1, 513, dtype=torch.bool), torch.zeros(1, model.text.hidden_size))
    assert pathway.records == []


def test_extractor_macs_hand_count_and_sparsity():
    """FE2E's extractor MACs equal the hand count of its convolutions; MESM spends fewer at lower top_p."""
    from nbsupport.models.mesm import extractor_macs

    torch.manual_seed(7)
    batch = make_batch(b=1, t=1)
    fe2e = FE2E("LV", config=small(), tiny_text=True)
    conv = lambda hw, cin, cout, k=3: hw * cin * cout * k * k  # noqa: E731  dense conv, one image
    hand = (conv(48 * 48, 1, 4, 5) + 4 * conv(24 * 24, 4, 4)  # stem: 5x5 conv, two VGG-4 blocks
            + conv(24 * 24, 4, 4) + conv(24 * 24, 4, 4)  # block 1 (4 -> 4) at 24x24
            + conv(12 * 12, 4, 8) + conv(12 * 12, 8, 8)  # block 2 (4 -> 8) at 12x12
            + conv(6 * 6, 8, 8) + conv(6 * 6, 8, 8))  # block 3 (8 -> 8) at 6x6
    assert extractor_macs(fe2e, batch)["macs"] == hand
    model = MESM("LV", top_p=1.0, config=small(), tiny_text=True)
    full = extractor_macs(model, batch)["macs"]
    model.top_p = 0.3
    assert extractor_macs(model, batch)["macs"] < full


@pytest.mark.parametrize("attention,top_p", [(True, 0.5), (True, 1.0), (False, 1.0)])
def test_sparse_between_blocks_equals_densify_between_blocks(attention, top_p):
    """Keeping sites sparse from block to block is an execution strategy only: outputs, every parameter's
    gradient and the recorded maps equal those of scattering each block's output to a dense grid."""
    torch.manual_seed(11)
    model = EndToEndModel("LAV", config=small(attention=attention, sparse=True, top_p=top_p), tiny_text=True).train()
    batch = make_batch(b=3, t=3, p=2, seed=5)
    runs = {}
    for handoff in ("sparse", "dense"):
        for pathway in model.pathways.values():
            pathway._block_handoff = handoff
        model.zero_grad()
        torch.manual_seed(0)  # the text encoder's dropout draws the same masks in both runs
        out = model(batch)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[handoff] = out.detach(), grads, model.last_maps
    (out_s, g_s, maps_s), (out_d, g_d, maps_d) = runs["sparse"], runs["dense"]
    torch.testing.assert_close(out_s, out_d, atol=1e-5, rtol=1e-5)
    assert g_s.keys() == g_d.keys() and any(".blocks.2." in n for n in g_s)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], atol=1e-5, rtol=1e-4, msg=name)
    for m in "AV":
        for r_s, r_d in zip(maps_s[m], maps_d[m], strict=True):
            assert torch.equal(r_s.kept, r_d.kept) and torch.equal(r_s.active, r_d.active)
            torch.testing.assert_close(r_s.attention, r_d.attention, atol=1e-6, rtol=1e-5)
    if top_p < 1.0:  # selection really dropped sites after the first block
        assert any(not r.kept[r.active].all() for r in maps_s["V"][1:])


def test_block_handoff_bad_value_is_named():
    model = MESM("LV", config=small(), tiny_text=True)
    model.pathways["V"]._block_handoff = "scatter"
    with pytest.raises(ValueError, match="block_handoff"):
        model(make_batch())


# ------------------------------------------------------------------ fidelity: the paper preset and its switches
def _conv(cin, cout, k, bias):
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c):
    return 2 * c


def test_paper_preset_parameter_counts_from_layer_sizes():
    from nbsupport.models.mesm import paper_parameter_count

    text, dim, ff, layers, n_out = 768, 64, 2048, 4, 6
    vgg = lambda cin, cout, bias: _conv(cin, cout, 3, bias) + _bn(cout) + _conv(cout, cout, 3, bias) + _bn(cout)
    stem = lambda cin: _conv(cin, 64, 5, True) + _bn(64) + 2 * vgg(64, 64, True)  # dense stage, with biases
    blocks = lambda bias: vgg(64, 128, bias) + vgg(128, 256, bias) + vgg(256, 512, bias)
    flatten = lambda grid: (512 * grid * 1024 + 1024) + (1024 * dim + dim)  # flatten -> 1024 -> ReLU -> 64
    layer = 4 * (dim * dim + dim) + (dim * ff + ff) + (ff * dim + dim) + 2 * _bn(dim)  # MHA, FFN, two LNs
    tail = layers * layer + dim + (dim * n_out + n_out)  # transformer, CLS vector, modality head
    # additive attention before each sparse block: W_q (no bias), W_k, v with bias; hidden = channels
    attention = sum(text * c + (c * c + c) + (c + 1) for c in (64, 128, 256))
    faces, mel = 3 * 3, 8 * 2  # 48x48 -> 3x3 and 128x32 -> 8x2 after the stem's and three blocks' pools
    common = (text * n_out + n_out) + 3  # text head, Linear(3, 1) fusion without bias
    fe2e = stem(3) + blocks(True) + flatten(faces) + tail + stem(1) + blocks(True) + flatten(mel) + tail + common
    assert fe2e == 25_098_901
    # MESM: SparseConvNet's submanifold convolutions have no bias; two attention stacks more
    mesm = fe2e - 2 * (blocks(True) - blocks(False)) + 2 * attention
    assert mesm == 25_957_275
    counts = {m: paper_parameter_count(m) for m in ("FE2E", "MESM")}
    assert counts["FE2E"]["non_text"] == fe2e and counts["MESM"]["non_text"] == mesm
    # ALBERT-base-v2 without its 30000 x 128 word-embedding table (Lan et al. 2020: ~11.7 M in all)
    assert counts["MESM"]["text_encoder"] + 30000 * 128 == pytest.approx(11.68e6, rel=0.01)


def test_attention_grad_none_only_selects_and_gets_no_gradient():
    torch.manual_seed(3)
    none = MESM("LAV", top_p=1.0, config=small(attention_grad="none"), tiny_text=True)
    fe2e = FE2E("LAV", config=small(), tiny_text=True)
    missing = fe2e.load_state_dict(none.state_dict(), strict=False)
    assert all(".cross_attention." in k for k in missing.unexpected_keys) and not missing.missing_keys
    batch = make_batch()
    none.eval(), fe2e.eval()
    # every site kept and features unchanged: exactly FE2E's dense network with the same weights
    torch.testing.assert_close(none(batch), fe2e(batch), atol=1e-4, rtol=1e-4)
    for mode, expect_grad in (("none", False), ("reweight", True)):
        torch.manual_seed(3)
        model = MESM("LAV", top_p=0.6, config=small(attention_grad=mode), tiny_text=True).train()
        model(batch).sum().backward()
        grads = [p.grad for n, p in model.named_parameters() if ".cross_attention." in n]
        assert all((g is not None and bool(g.abs().sum() > 0)) == expect_grad for g in grads)
    # "none" keeps the sites' features: the block input equals the stem output at the kept sites
    path = MESM("LA", top_p=0.5, config=small(attention_grad="none"), tiny_text=True).eval().pathways["A"]
    x = torch.randn(2, 4, 5, 3)
    active = torch.ones(2, 5, 3, dtype=torch.bool)
    out, keep, w = path._select(0, x, active, torch.randn(2, 32))
    assert torch.equal(out, x) and torch.equal(keep.flatten(1), top_p_keep(w.flatten(1), 0.5))


def test_linear_fusion_with_hand_set_weights():
    torch.manual_seed(0)
    model = MESM("LAV", top_p=0.7, config=small(fusion="linear"), tiny_text=True).eval()
    assert isinstance(model.fusion, torch.nn.Linear) and model.fusion.weight.shape == (1, 3)
    with torch.no_grad():
        for k, m in enumerate("LAV"):  # head m outputs the constant k + 1 for every emotion
            model.heads[m].weight.zero_()
            model.heads[m].bias.fill_(k + 1.0)
        model.fusion.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))  # weights of L, A, V
    out = model(make_batch())
    assert torch.allclose(out, torch.full((3, 6), 0.5 * 1 - 1.0 * 2 + 2.0 * 3))  # 4.5, unnormalised
    assert model.fusion_weights() == {"L": 0.5, "A": -1.0, "V": 2.0}
    soft = MESM("LAV", top_p=0.7, config=small(), tiny_text=True).eval()
    soft.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fusion")}, strict=False)
    assert torch.allclose(soft(make_batch()), torch.full((3, 6), (1 + 2 + 3) / 3))  # softmax of zeros
    single = FE2E("L", config=small(fusion="linear"), tiny_text=True).eval()
    torch.testing.assert_close(single(make_batch()), single.heads["L"](single.text(make_batch()["input_ids"])))


def test_without_positions_the_frames_are_a_set():
    batch = make_batch(b=1, t=4)
    batch["faces"] = batch["faces"] * torch.tensor([0.1, 0.5, 1.0, 2.0])[None, :, None, None]  # distinct frames
    perm = dict(batch, faces=batch["faces"][:, [2, 0, 3, 1]])
    for positions, invariant in (("none", True), ("learned", False)):
        torch.manual_seed(0)
        model = FE2E("LV", config=small(positions=positions), tiny_text=True).eval()
        path = model.pathways["V"]
        assert (path.position is None) == (positions == "none")
        if path.position is not None:
            with torch.no_grad():
                path.position.normal_()  # positions that clearly tell the frames apart
        # an untrained tiny CNN maps every frame to almost the same vector: amplify what differs
        path.proj.register_forward_hook(lambda mod, inp, out: (out - mod.bias) * 1e3 + mod.bias)
        cls = torch.randn(1, model.text.hidden_size)
        with torch.no_grad():
            same = torch.allclose(path(batch["faces"], batch["faces_mask"], cls),
                                  path(perm["faces"], perm["faces_mask"], cls), atol=1e-5)
        assert same == invariant


def test_flatten_head_rgb_stem_biases_and_text_group():
    torch.manual_seed(0)
    cfg = small(head="flatten", flatten_hidden=20, face_channels=3, conv_bias=True, score_bias=True,
                text_head_lr="text")
    model = FE2E("LAV", config=cfg, tiny_text=True)
    v, a = model.pathways["V"], model.pathways["A"]
    assert v.proj[0].in_features == 8 * 3 * 3 and a.proj[0].in_features == 8 * 8 * 2  # channels x grid
    assert v.proj[0].out_features == 20 and v.proj[2].out_features == SIZES["dim"]
    assert v.stem.conv0.in_channels == 3 and a.stem.conv0.in_channels == 1
    assert v.stem.conv0.bias is not None and v.blocks[0].conv1.conv.bias is not None
    groups = model.param_groups(1.0)
    assert {id(p) for p in model.heads["L"].parameters()} <= {id(p) for p in groups[1]["params"]}
    assert groups[1]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="input_sizes"):
        FE2E("LV", config=small(head="flatten", input_sizes={"V": (50, 50)}), tiny_text=True)
    with pytest.raises(ValueError, match="attention_grad"):
        MESM("LV", config=small(attention_grad="detach"), tiny_text=True)
    with pytest.raises(ValueError, match="fusion"):
        FE2E("LV", config=small(fusion="mean"), tiny_text=True)


def test_rgb_stem_on_grey_crops_equals_the_summed_kernel_and_biases_cancel_in_batchnorm():
    batch = make_batch()
    torch.manual_seed(0)
    rgb = FE2E("LV", config=small(face_channels=3, conv_bias=True), tiny_text=True).train()
    grey = FE2E("LV", config=small(), tiny_text=True).train()
    state = rgb.state_dict()
    state["pathways.V.stem.conv0.weight"] = state["pathways.V.stem.conv0.weight"].sum(1, keepdim=True)
    with torch.no_grad():  # random conv biases: BatchNorm (training statistics) subtracts them again
        for n, p in rgb.named_parameters():
            if n.endswith("conv.bias") or n.endswith("conv0.bias"):
                p.copy_(torch.randn_like(p))
    grey.load_state_dict({k: v for k, v in state.items() if not k.endswith(("conv.bias", "conv0.bias"))})
    torch.manual_seed(1)
    a = rgb(batch)
    torch.manual_seed(1)
    torch.testing.assert_close(a, grey(batch), atol=1e-4, rtol=1e-4)
    three = dict(batch, faces=batch["faces"][:, :, None].expand(-1, -1, 3, -1, -1))  # explicit RGB input
    torch.manual_seed(1)
    torch.testing.assert_close(rgb(three), a, atol=1e-5, rtol=1e-5)


def test_paper_preset_builds_and_runs_small():
    from nbsupport.models.mesm import MesmConfig

    torch.manual_seed(0)
    cfg = MesmConfig.paper("MESM", stem_channels=4, block_channels=(4, 8, 8), dim=8, layers=1, heads=2,
                           flatten_hidden=16)
    model = cfg.build("LAV", tiny_text=True).eval()
    assert model(make_batch()).shape == (3, 6)
    assert model.top_p == 0.8  # the README's -st=0.8
    assert model.pathways["V"].cross_attention[1].w_key.out_features == 4  # hidden = block input channels
    assert model.pathways["V"].cross_attention[2].w_key.out_features == 8
    assert model.pathways["V"].encoder[0].ff.net[0].out_features == 2048
    assert MesmConfig.paper("FE2E").top_p == 1.0 and not MesmConfig.paper("FE2E").sparse
    with pytest.raises(TypeError):
        MesmConfig.paper(hidden=3)
    with pytest.raises(ValueError, match="model"):
        MesmConfig.paper("MulT")


@pytest.mark.slow  # trains MESM twice (~7 s)
def test_compare_attention_grad_trains_both_settings_from_the_same_start():
    from torch.utils.data import DataLoader

    from nbsupport.protocol import compare_attention_grad

    batches = [make_batch(b=4, seed=s) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}

    def build(setting):
        return MESM("LAV", top_p=0.7, config=small(attention_grad=setting), tiny_text=True)

    out = compare_attention_grad(build, loaders, epochs=2, lr=1e-2, device="cpu", resamples=50, progress=False)
    assert [r["attention_grad"] for r in out["rows"]] == ["reweight", "none"]
    torch.manual_seed(0)
    start = build("none").state_dict()
    trained = {s: out["fits"][s].model.state_dict() for s in ("reweight", "none")}
    att = [k for k in start if ".cross_attention." in k]
    # "none": the attention keeps its initial weights; "reweight" learns them; both train the rest
    assert att and all(torch.equal(trained["none"][k], start[k]) for k in att)
    assert any(not torch.equal(trained["reweight"][k], start[k]) for k in att)
    assert not torch.equal(trained["none"]["heads.A.weight"], start["heads.A.weight"])
    d = out["difference"]
    wacc = {r["attention_grad"]: r["wacc"] for r in out["rows"]}
    assert d.value == pytest.approx(wacc["reweight"] - wacc["none"])  # the rows' own test wacc
    assert d.low <= d.value <= d.high and "MESM (reweight)" in out["verdict"]
    # a setting the caller already trained the same way is reused, not trained again: the same result
    again = compare_attention_grad(build, loaders, epochs=2, lr=1e-2, device="cpu", resamples=50, progress=False,
                                   trained={"reweight": (out["rows"][0], out["fits"]["reweight"])})
    assert again["fits"]["reweight"] is out["fits"]["reweight"]
    assert again["difference"].value == pytest.approx(d.value)
    for k, v in out["fits"]["none"].model.state_dict().items():  # "none" trained afresh, identically
        assert torch.equal(again["fits"]["none"].model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="another attention_grad"):
        compare_attention_grad(build, loaders, epochs=1, lr=1e-2, device="cpu", resamples=50, progress=False,
                               trained={"reweight": (out["rows"][1], out["fits"]["none"])})


def test_training_seconds_leave_out_the_callbacks():
    """Chapter 6 compares MESM's training time with FE2E's while only MESM runs the lift measurement after
    each epoch: the row's seconds must not count the time spent in callbacks."""
    import time

    from torch.utils.data import DataLoader

    from nbsupport.protocol import train_and_test

    batches = [make_batch(b=4, seed=s) for s in range(2)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    torch.manual_seed(0)
    model = MESM("LAV", top_p=0.7, config=small(), tiny_text=True)
    calls = []
    start = time.perf_counter()
    row, _ = train_and_test(model, loaders, name="MESM", epochs=2, lr=1e-2, device="cpu", progress=False,
                            callbacks=[lambda epoch, r: calls.append(epoch) or time.sleep(1.0)])
    wall = time.perf_counter() - start
    assert calls == [1, 2]
    assert row["seconds"] <= wall - 2.0 + 0.05  # the two 1 s sleeps are not training time


# ---------------------------------------------- the reference code's bug and SparseConvNet's defaults as switches
def test_reference_site_order_on_a_hand_made_grid():
    from nbsupport.models.mesm import reference_site_order
    from nbsupport.sparse import SparseTensor

    # kept sites in (frame, y, x) order with features a..e (1 channel: 1..5)
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0]])
    s = SparseTensor(torch.arange(1.0, 6.0)[:, None], coords, (2, 2), 2)
    out = reference_site_order(s)
    # the same sites sorted by (y, x, frame): (0,0,f0) (0,0,f1) (0,1,f0) (1,0,f1) (1,1,f0), row i <- feature i
    expected = torch.zeros(2, 1, 2, 2)
    expected[0, 0, 0, 0], expected[1, 0, 0, 0], expected[0, 0, 0, 1] = 1, 2, 3
    expected[1, 0, 1, 0], expected[0, 0, 1, 1] = 4, 5
    assert torch.equal(out.dense(), expected)
    assert torch.equal(s.dense()[0, 0], torch.tensor([[1.0, 2.0], [0.0, 3.0]]))  # the input was untouched


def test_reference_site_order_equals_the_reference_code_indexing():
    """The scrambled block-1 input equals what the authors' lines build: locations from
    ``attn.permute(1, 2, 0).nonzero()`` (y, x, frame) paired row by row with ``x[bs, :, y, x]``."""
    from nbsupport.models.mesm import reference_site_order
    from nbsupport.sparse import to_sparse

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 6, 4, generator=g)  # (frames, C, H, W) after the stem
    attn = torch.rand(3, 6, 4, generator=g) * (torch.rand(3, 6, 4, generator=g) > 0.4)  # kept weights
    locations = attn.permute(1, 2, 0).nonzero()  # (N, 3) = (y, x, frame)
    bs, y, xx = attn.nonzero(as_tuple=True)
    features = x[bs, :, y, xx]  # (N, C) in (frame, y, x) order
    ref = torch.zeros(3, 5, 6, 4)
    ref[locations[:, 2], :, locations[:, 0], locations[:, 1]] = features  # InputLayer: row i at location i
    ours = reference_site_order(to_sparse(x, attn > 0)).dense()
    assert torch.equal(ours, ref)
    moved = (ref != x * (attn > 0)[:, None]).any(1) & (attn > 0)
    assert int(moved.sum()) > 0.8 * int((attn > 0).sum())  # nearly every site holds another's features


def _block1_input(model, m):
    seen = {}
    model.pathways[m].blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("s", args[0]))
    return seen


@pytest.mark.parametrize("handoff", ["sparse", "dense"])
def test_site_order_switch_scrambles_block_one_only(handoff):
    from nbsupport.models.mesm import MesmConfig, reference_site_order

    batch = make_batch()
    inputs, outputs = {}, {}
    for order in ("matched", "reference"):
        torch.manual_seed(0)
        cfg = small(site_order=order)
        model = MESM("LAV", top_p=0.7, config=cfg, tiny_text=True).eval()
        for p in model.pathways.values():
            p._block_handoff = handoff
        seen = _block1_input(model, "V")
        with torch.no_grad():
            outputs[order] = model(batch)
        inputs[order] = seen["s"]
        kept = [r.kept for r in model.last_maps["V"]]
        if order == "matched":
            kept_matched = kept
    assert all(torch.equal(a, b) for a, b in zip(kept_matched[:1], kept[:1]))  # same sites kept in block 1
    a, b = inputs["matched"], inputs["reference"]
    assert torch.equal(reference_site_order(a).dense(), b.dense())
    assert not torch.allclose(outputs["matched"], outputs["reference"])


def test_sparse_bn_eps_and_he_initialisation_as_sparseconvnet():
    from nbsupport.models.mesm import MesmConfig

    torch.manual_seed(0)
    cfg = MesmConfig(stem_channels=64, block_channels=(128, 8, 8), dim=8, layers=1, heads=2,
                     sparse_bn_eps=1e-4, sparse_conv_init="he").mesm(0.7)
    model = cfg.build("LV", tiny_text=True)
    block = model.pathways["V"].blocks[0]
    assert block.conv1.bn.eps == 1e-4 and block.conv2.bn.eps == 1e-4
    w = block.conv1.conv.weight.detach()  # 128 x 64 x 3 x 3 = 73,728 draws of N(0, 2 / (64 * 9))
    assert abs(float(w.mean())) < 5 * math.sqrt(2 / 576) / math.sqrt(w.numel())  # 5 standard errors
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)
    book = MESM("LV", config=MesmConfig(stem_channels=64, block_channels=(128, 8, 8), dim=8, layers=1, heads=2),
                tiny_text=True)
    wb = book.pathways["V"].blocks[0].conv1.conv.weight.detach()  # PyTorch's kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 fan_in)
    assert float(wb.std()) == pytest.approx(1 / math.sqrt(3 * 576), rel=0.02)
    assert book.pathways["V"].blocks[0].conv1.bn.eps == 1e-5
    fe2e = FE2E("LV", config=cfg, tiny_text=True)  # dense blocks keep PyTorch's init (reference e2e.py)
    assert fe2e.pathways["V"].blocks[0].conv1.bn.eps == 1e-5


def test_mesm_config_paper_reference_bugs_and_one_line_builds():
    import dataclasses

    from nbsupport.models.mesm import REFERENCE_BUGS, MesmConfig

    fixed, buggy = MesmConfig.paper(), MesmConfig.paper(reference_bugs=True)
    diff = {f.name for f in dataclasses.fields(fixed) if getattr(fixed, f.name) != getattr(buggy, f.name)}
    assert diff == set(REFERENCE_BUGS) == {"site_order"} and buggy.site_order == "reference"
    assert (fixed.sparse_bn_eps, fixed.sparse_conv_init, fixed.top_p) == (1e-4, "he", 0.8)
    book = MesmConfig()
    assert (book.site_order, book.sparse_bn_eps, book.sparse_conv_init) == ("matched", 1e-5, "torch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        book.dim = 3
    params = dict(seed=0, epochs=4, stem_channels=4, block_channels=[4, 8, 8], dim=8, layers=1, heads=2,
                  top_p=0.5, attention_hidden=8, dropout=0.0)
    cfg = MesmConfig.from_parameters(params)
    assert cfg.block_channels == (4, 8, 8) and cfg.top_p == 1.0  # the model choice is MESM()/FE2E()'s
    torch.manual_seed(0)
    one = MESM("LAV", top_p=0.5, config=cfg, tiny_text=True)
    torch.manual_seed(0)
    direct = MESM("LAV", top_p=0.5, config=small(), tiny_text=True)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), direct.state_dict().values()))
    with pytest.raises(ValueError, match="site_order"):
        MesmConfig(site_order="shuffled")
    with pytest.raises(TypeError):  # sizes and switches go in the config, never as keywords
        EndToEndModel("LAV", dim=4)
    with pytest.raises(TypeError, match="'config' must be a MesmConfig"):
        EndToEndModel("LAV", config={"dim": 4})


@pytest.mark.parametrize("handoff", ["sparse", "dense"])
def test_fused_site_scores_equal_the_composed_attention_layers_in_the_whole_model(handoff, monkeypatch):
    """MESM's cross-modal attention runs through the fused, chunked ``site_scores``; with the scores
    written instead with PyTorch's layers and tanh (the formula the model had before), a training
    step gives the same logits, kept sites and gradients of every parameter."""
    from nbsupport import attention

    def composed(self, query, keys, values=None, mask=None, *, frame=None):
        assert frame is not None  # the model scores packed sites only
        return self.v(torch.tanh(self.w_query(query)[frame] + self.w_key(keys))).squeeze(1)

    torch.manual_seed(2)
    model = MESM("LAV", top_p=0.6, config=small(attention_hidden=16), tiny_text=True).train()
    batch = make_batch(b=3, t=3, p=2, seed=7)
    runs = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(attention.AdditiveAttention, "forward", composed)
        for pathway in model.pathways.values():
            pathway._block_handoff = handoff
        model.zero_grad()
        torch.manual_seed(0)
        out = model(batch)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     [r.kept for m in "AV" for r in model.last_maps[m]]))
    (out_f, g_f, kept_f), (out_c, g_c, kept_c) = runs
    torch.testing.assert_close(out_f, out_c, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept_f, kept_c, strict=True))
    assert g_f.keys() == g_c.keys() and any(".cross_attention.2." in n for n in g_f)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_c[name], atol=1e-5, rtol=1e-4, msg=name)


def test_mac_count_of_the_fused_attention_equals_the_composed_layers(monkeypatch):
    """nbsupport.flops counts the fused site scores as the W_k and v linear layers they replace: the
    extractor's MAC table (layer names, rows, MACs) equals the one of the layer-by-layer attention.
    (top_p = 1: every site kept, so no float-level difference of the scores can move a selection
    boundary and change the later blocks' sites.)"""
    from nbsupport import attention
    from nbsupport.models.mesm import extractor_macs

    torch.manual_seed(4)
    model = MESM("LAV", top_p=1.0, config=small(), tiny_text=True)
    batch = make_batch(seed=3)
    fused = extractor_macs(model, batch)["table"]
    monkeypatch.setattr(attention.AdditiveAttention, "forward", lambda self, query, keys, frame=None: self.v(
        torch.tanh(self.w_query(query)[frame] + self.w_key(keys))).squeeze(1))
    composed = extractor_macs(model, batch)["table"]
    assert any(composed["layer"].str.endswith("cross_attention.0.w_key"))
    assert fused.to_dict("records") == composed.to_dict("records")


def test_mesm_seed_runs_share_one_mesm_run_per_seed_with_the_bug_cost():
    """Chapter 6's verdicts across seeds: every (variant, seed) is trained once, each MESM variant of a seed
    starts from that seed's MESM weights, and the MESM run of a seed is exactly the "without the bug" run
    of protocol.mesm_bug_cost (same trained weights), so the chapter shares it instead of training twice."""
    from torch.utils.data import DataLoader

    from nbsupport import protocol
    from nbsupport.data.text import TINY_TEXT_MODEL
    from nbsupport.models.mesm import MesmConfig

    batches = [make_batch(b=4, seed=s) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    cfg = MesmConfig(stem_channels=4, block_channels=(4, 8, 8), dim=8, layers=1, heads=2, attention_hidden=8,
                     dropout=0.0)

    def checksum(model):  # the trained weights, as one number per parameter tensor
        return {k: float(v.double().sum()) for k, v in model.state_dict().items() if v.is_floating_point()}

    starts, real = [], protocol.train_and_test

    def spy(model, *args, **kw):
        starts.append((kw["name"], kw["seed"], {k: v.clone() for k, v in model.state_dict().items()}))
        return real(model, *args, **kw)

    protocol.train_and_test = spy
    try:
        runs = protocol.mesm_seed_runs(loaders, cfg, seeds=[0, 1], epochs=1, lr=1e-2, text_model=TINY_TEXT_MODEL,
                                       device="cpu", attention_grad_seeds=1, measure=checksum, progress=False)
    finally:
        protocol.train_and_test = real
    trained = sorted((n, s) for n, s, _ in starts)
    assert trained == [("FE2E", 0), ("FE2E", 1), ("MESM", 0), ("MESM", 1), ("MESM (fixed attention)", 0),
                       ("MESM (site-order bug)", 0), ("MESM (site-order bug)", 1)]
    start = {(n, s): w for n, s, w in starts}
    for other in [("MESM (site-order bug)", 0), ("MESM (site-order bug)", 1), ("MESM (fixed attention)", 0)]:
        mesm = start[("MESM", other[1])]
        assert start[other].keys() == mesm.keys() and all(torch.equal(start[other][k], mesm[k]) for k in mesm)
    assert not torch.equal(start[("MESM", 0)]["heads.A.weight"], start[("MESM", 1)]["heads.A.weight"])
    assert set(runs.measures) == {"MESM", "MESM (site-order bug)", "MESM (fixed attention)"}  # not FE2E

    cost = protocol.mesm_bug_cost(loaders, cfg, {"site_order": "reference"}, seeds=[0], text_model=TINY_TEXT_MODEL,
                                  epochs=1, lr=1e-2, device="cpu", measure=checksum, progress=False)
    row = cost["per_seed"][0]
    for setting, name in (("fixed", "MESM"), ("bug", "MESM (site-order bug)")):
        ours = runs.measures[name][0]
        assert {k: row[f"{setting}: {k}"] for k in ours} == ours  # the same trained weights, exactly
    table = runs.table().set_index(["model", "seed"])
    assert row["fixed"] == table.loc[("MESM", 0), "wacc"] and row["bug"] == table.loc[("MESM (site-order bug)", 0),
                                                                                      "wacc"]
    verdicts = protocol.mesm_seed_verdicts(runs)
    assert set(verdicts) == {"mesm_vs_fe2e", "site_order_bug", "attention_grad"}
    assert verdicts["mesm_vs_fe2e"].seeds == (0, 1) and verdicts["attention_grad"].seeds == (0,)
    assert (verdicts["site_order_bug"].a, verdicts["site_order_bug"].b) == ("MESM (site-order bug)", "MESM")
    assert "top_p" not in table and not table["wacc"].isna().any()


def test_mesm_metrics_carries_each_object_of_the_run_into_metrics_json():
    """Chapter 6's ``metrics.json`` keys (protocol.mesm_metrics): tables as records, None where an analysis
    did not run, each model's test wacc (the point of its interval) computed from its predictions."""
    import json
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from sklearn.metrics import balanced_accuracy_score

    from nbsupport import evidence, protocol

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (30, 6))
    decisions = np.where(rng.random((30, 6)) < 0.8, labels, 1 - labels)
    preds = evidence.Predictions("emotion", decisions, labels.astype(float), list(range(30)))
    fits = {"MESM": SimpleNamespace(extra={"test": preds})}
    model = SimpleNamespace(fusion_weights=lambda: {"L": 0.5, "V": 0.5})
    sweep = pd.DataFrame({"top_p": [0.3, 1.0], "wacc": [0.6, 0.7]})
    out = protocol.mesm_metrics(model, fits, seed=0, sweep=sweep, lift_verdicts=("s",), skipped="no cues")
    assert list(out) == ["sweep", "interpretability", "lift_by_epoch", "lift_verdicts", "skipped",
                         "sparse_backend", "fusion_weights", "intervals", "seed_verdicts", "seed_runs",
                         "seed_lifts"]
    assert out["sweep"] == [{"top_p": 0.3, "wacc": 0.6}, {"top_p": 1.0, "wacc": 0.7}]
    assert out["interpretability"] is None and out["lift_by_epoch"] is None and out["seed_runs"] is None
    assert out["lift_verdicts"] == ["s"] and out["skipped"] == "no cues" and out["fusion_weights"]["L"] == 0.5
    wacc = out["intervals"]["wacc"]["MESM"]
    # WAcc = (TP N/P + TN) / 2N = balanced accuracy, averaged over the emotion columns (scikit-learn)
    assert wacc["value"] == pytest.approx(np.mean([balanced_accuracy_score(labels[:, j], decisions[:, j])
                                                   for j in range(6)]))
    assert wacc["low"] <= wacc["value"] <= wacc["high"]
    this_run = evidence.Comparison("MESM", "FE2E", "wacc", evidence.Estimate(0.1, 0.0, 0.2), "S.")
    with_fe2e = protocol.mesm_metrics(model, fits, seed=0, this_run=this_run)
    assert with_fe2e["this_run_mesm_vs_fe2e"] == {"sentence": "S.", "value": 0.1, "low": 0.0, "high": 0.2,
                                                  "level": 0.95}
    json.dumps(with_fe2e)
