"""Tests of nbsupport.models.umons: glimpse against a hand-written reference, padding invariance,
co-attention wiring, overfitting a tiny batch, the paper configuration."""
import dataclasses

import pytest
import torch

from nbsupport.models.umons import BOOK_CONFIG_AT_PAPER_SIZES, GlimpseLayer, UmonsConfig, UmonsTransformer

DIMS = {"L": 12, "A": 10, "V": 14}
SMALL = dict(hidden_size=16, ff_size=32, layers=2, heads=2, dropout=0.0, seq_len=8)


def _batch(b=3, lengths=None, seed=0, pad_to=None):
    """Random UMONS batch; positions past each length are padding (mask False)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or {"L": [5, 3, 7], "A": [8, 2, 6], "V": [4, 6, 1]}
    batch = {}
    for m, field in (("L", "text"), ("A", "audio"), ("V", "video")):
        t = pad_to or max(lengths[m])
        batch[field] = torch.randn(b, t, DIMS[m], generator=g)
        batch[f"{field}_mask"] = torch.arange(t)[None, :] < torch.tensor(lengths[m])[:, None]
    batch["emotion"] = (torch.rand(b, 6, generator=g) > 0.5).float()
    return batch


def _with_garbage_padding(batch, extra=3, seed=1):
    """Append ``extra`` padded positions filled with large garbage, and overwrite existing padding too."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for field in ("text", "audio", "video"):
        x, mask = batch[field], batch[f"{field}_mask"]
        x = torch.cat([x, torch.zeros(x.shape[0], extra, x.shape[2])], 1)
        mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], 1)
        garbage = 100 * torch.randn(x.shape, generator=g)
        out[field] = torch.where(mask[..., None], x, garbage)
        out[f"{field}_mask"] = mask
    return out


def test_glimpse_matches_a_per_example_reference():
    torch.manual_seed(0)
    layer = GlimpseLayer(8, glimpses=3, merge=True)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, mask)
    for b in range(2):
        real = x[b, mask[b]]  # (T_real, 8): the reference never sees the padding
        w = torch.softmax(layer.mlp(real), dim=0)  # (T_real, 3), softmax over positions
        g = (w.T @ real).reshape(-1)  # concat of the 3 glimpses
        assert torch.allclose(out[b], layer.proj(g), atol=1e-6)
        assert torch.allclose(layer.weights[b, :, ~mask[b]], torch.zeros(3, int((~mask[b]).sum())))
    seq = GlimpseLayer(8, glimpses=5, merge=False)(x, mask)
    assert seq.shape == (2, 5, 8)


@pytest.mark.parametrize("modalities", ["L", "A", "V", "LA", "LV", "LAV"])
def test_padding_never_changes_an_output(modalities):
    torch.manual_seed(0)
    model = UmonsTransformer(modalities, 6, input_dims=DIMS, **SMALL).eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(batch)
        maps_ref = model.attention_maps()
        out = model(_with_garbage_padding(batch))
        maps = model.attention_maps()
    assert torch.allclose(ref, out, atol=1e-5)
    for m in modalities:
        assert torch.allclose(maps_ref["glimpse"][m], maps["glimpse"][m], atol=1e-6)
        field_mask = batch[{"L": "text", "A": "audio", "V": "video"}[m] + "_mask"]
        pad = torch.nn.functional.pad(field_mask, (0, SMALL["seq_len"] - field_mask.shape[1]))
        assert torch.all(maps["glimpse"][m][~pad] == 0)  # no weight on padding
        assert torch.allclose(maps["glimpse"][m].sum(-1), torch.ones(3))


def test_each_example_is_independent_of_the_others():
    torch.manual_seed(0)
    model = UmonsTransformer("LAV", 6, input_dims=DIMS, **SMALL).eval()
    batch = _batch()
    with torch.no_grad():
        full = model(batch)
        one = model({k: v[1:2] for k, v in batch.items()})
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_coattention_makes_audio_depend_on_language_and_shapes():
    torch.manual_seed(0)
    model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL).eval()
    batch = _batch()
    with torch.no_grad():
        model(batch)
        maps = model.attention_maps()
    co = maps["coattention"]["A"]
    assert len(co) == SMALL["layers"] and co[0].shape == (3, SMALL["heads"], SMALL["seq_len"], SMALL["seq_len"])
    # frames attend only to real words: zero weight on padded words, rows of real frames sum to 1
    text_mask = torch.nn.functional.pad(batch["text_mask"], (0, SMALL["seq_len"] - batch["text_mask"].shape[1]))
    for b in range(3):
        assert torch.all(co[0][b][..., ~text_mask[b]] == 0)
        assert torch.allclose(co[0][b].sum(-1), torch.ones_like(co[0][b].sum(-1)))
    # the final audio glimpse vector changes when only the words change (co-attention wiring)
    other = dict(batch, text=torch.randn_like(batch["text"]))
    with torch.no_grad():
        model(batch)
        g1 = model.final_glimpse["A"].weights.clone()
        model(other)
        g2 = model.final_glimpse["A"].weights.clone()
    assert not torch.allclose(g1, g2)


@pytest.mark.parametrize("modalities", ["L", "A", "V", "LA", "LAV"])
def test_each_model_overfits_a_tiny_batch(modalities):
    torch.manual_seed(0)
    model = UmonsTransformer(modalities, 6, input_dims=DIMS, **{**SMALL, "hidden_size": 32, "ff_size": 64})
    batch = _batch(b=6, lengths={"L": [5, 3, 7, 8, 2, 6], "A": [8, 2, 6, 4, 5, 7], "V": [4, 6, 1, 8, 3, 5]})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(150):
        loss = loss_fn(model(batch), batch["emotion"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(batch) > 0
    assert loss.item() < 0.05
    assert torch.equal(pred.float(), batch["emotion"])


def test_describe_reports_the_configuration_and_parameter_count():
    config = UmonsConfig(hidden_size=24, ff_size=40, layers=3, heads=3, dropout=0.2, seq_len=9, aux_weight=0.5,
                         input_dropout=0.1)
    model = UmonsTransformer("VL", 6, config=config, input_dims=DIMS)
    frozen = model.adapters["L"].net.weight_ih_l0.requires_grad_(False).numel()  # frozen weights are not counted
    n_all = sum(p.numel() for p in model.parameters())
    assert model.describe() == {"modalities": "LV", **dataclasses.asdict(config), "n_params": n_all - frozen}


def test_paper_configuration_builds():
    model = UmonsTransformer("LAV", 6, config=BOOK_CONFIG_AT_PAPER_SIZES)
    info = model.describe()
    assert info["n_params"] > 10_000_000
    batch = {"text": torch.randn(2, 70, 300), "audio": torch.randn(2, 50, 80), "video": torch.randn(2, 60, 512)}
    assert model.eval()(batch).shape == (2, 6)  # inputs longer than seq_len are cut to 60


def test_bad_configuration_and_inputs_are_named():
    with pytest.raises(ValueError, match="heads"):
        UmonsConfig(hidden_size=10, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        UmonsConfig(dropout=1.5)
    with pytest.raises(ValueError, match="must include 'L'"):
        UmonsTransformer("AV", 6)
    with pytest.raises(ValueError, match="modalities"):
        UmonsTransformer("LX", 6)
    model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL)
    with pytest.raises(KeyError, match="audio"):
        model({"text": torch.randn(1, 3, 12)})
    with pytest.raises(ValueError, match="'text'"):
        model({"text": torch.randn(1, 3, 5), "audio": torch.randn(1, 3, 10)})


def test_input_normalisation_uses_real_positions_only():
    model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL)
    batch = _with_garbage_padding(_batch())
    model.fit_input_normalisation([batch])
    for m, field in (("L", "text"), ("A", "audio")):
        real = batch[field][batch[f"{field}_mask"]].double()  # numpy-independent reference: torch mean/std
        assert torch.allclose(model.adapters[m].in_mean, real.mean(0).float(), atol=1e-5)
        assert torch.allclose(model.adapters[m].in_std, real.std(0, unbiased=False).float(), atol=1e-5)


@pytest.mark.parametrize("modalities", ["LA", "LAV"])
def test_padding_never_changes_an_output_with_aux_heads_and_input_dropout(modalities):
    torch.manual_seed(0)
    model = UmonsTransformer(modalities, 6, input_dims=DIMS, **SMALL, aux_weight=1.0, input_dropout=0.3).eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(batch)
        out = model(_with_garbage_padding(batch))
    assert torch.allclose(ref, out, atol=1e-5)
    assert model.auxiliary_loss(batch, lambda logits: logits.sum()) is None  # no auxiliary loss in eval
    plain = UmonsTransformer(modalities, 6, input_dims=DIMS, **SMALL).eval()
    plain.load_state_dict(model.state_dict())  # same parameters: the options add none
    with torch.no_grad():
        assert torch.allclose(plain(batch), ref, atol=1e-6)  # input dropout is the identity in eval


def test_auxiliary_loss_is_the_mean_per_modality_loss_of_the_shared_head():
    torch.manual_seed(0)
    model = UmonsTransformer("LAV", 6, input_dims=DIMS, **SMALL, aux_weight=0.7).train()  # dropout 0 in SMALL
    captured = {}
    for m, layer in model.final_glimpse.items():  # capture the glimpse vectors independently of the model
        layer.register_forward_hook(lambda mod, inp, out, m=m: captured.__setitem__(m, out.detach()))
    batch = _batch()
    model(batch)
    y = batch["emotion"]
    crit = lambda logits: torch.nn.functional.binary_cross_entropy_with_logits(logits, y)  # noqa: E731
    aux = model.auxiliary_loss(batch, crit)
    ln, fc = model.norm, model.classifier
    expected = 0.7 * sum(crit(torch.nn.functional.linear(torch.nn.functional.layer_norm(
        captured[m], (SMALL["hidden_size"],), ln.weight, ln.bias, ln.eps), fc.weight, fc.bias))
        for m in "LAV") / 3
    assert aux.dim() == 0 and torch.allclose(aux, expected, atol=1e-6)
    aux.backward()
    assert model.final_glimpse["V"].proj.weight.grad.abs().sum() > 0  # every modality is supervised
    # off by default, and for a single modality
    assert UmonsTransformer("LAV", 6, input_dims=DIMS, **SMALL).train().auxiliary_loss(batch, crit) is None
    single = UmonsTransformer("A", 6, input_dims=DIMS, **SMALL, aux_weight=1.0).train()
    single(batch)
    assert single.auxiliary_loss(batch, crit) is None


def test_input_dropout_drops_features_in_training_only():
    torch.manual_seed(0)
    model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL, input_dropout=0.5)
    batch = _batch()
    seen = []
    model.adapters["A"].net.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    model.train()(batch)
    model.eval()(batch)
    real = torch.nn.functional.pad(batch["audio_mask"], (0, SMALL["seq_len"] - batch["audio_mask"].shape[1]))
    train_in, eval_in = seen
    dropped = (train_in == 0) & real[..., None]
    assert 0.3 < dropped.float().sum() / (real.sum() * DIMS["A"]) < 0.7  # about half the real features
    # kept features are scaled by 1 / (1 - p), as torch.nn.functional.dropout does
    assert torch.allclose(train_in[~dropped & real[..., None]], 2 * eval_in[~dropped & real[..., None]])


def test_bad_aux_options_are_named():
    with pytest.raises(ValueError, match="input_dropout"):
        UmonsConfig(input_dropout=1.0)
    with pytest.raises(ValueError, match="aux_weight"):
        UmonsConfig(aux_weight=-1)


@pytest.mark.slow  # generates a 24-utterance corpus and its UMONS features (~7 s)
def test_umons_loaders_and_utterance_words(tmp_path, monkeypatch):
    """The Chapter 3-4 data set-up on a small synthetic corpus: seeded loaders over every split, in
    dataset order for valid/test, and the words of an utterance as the raw transcript gives them."""
    from nbsupport.data import RawSplit, ensure_corpus
    from nbsupport.data.features import split_words
    from nbsupport.models.umons import utterance_words
    from nbsupport.protocol import loaders as build_loaders

    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "corpus"))
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "features"))
    root = ensure_corpus(None, n=24, seed=0, progress=False)
    splits, loaders = build_loaders("umons", root, seq_len=6, batch_size=4, seed=0)
    assert set(splits) == set(loaders) == {"train", "valid", "test"}
    raw_test = RawSplit(root, "mosei", "test")
    ids = [uid for batch in loaders["test"] for uid in batch["ids"]]
    assert ids == list(raw_test.ids) and len(loaders["train"].dataset) == len(RawSplit(root, "mosei", "train"))
    batch = next(iter(loaders["test"]))
    assert batch["text"].shape[1] <= 6 and batch["audio"].shape[1] <= 6 and batch["video"].shape[1] <= 6
    item = raw_test[len(raw_test) - 1]
    assert utterance_words(splits["test"], item["id"], 6) == split_words(item["text"])[:6]


# ------------------------------------------------------------------ fidelity: the paper preset and its switches
def test_reference_layernorm_on_a_3_vector_by_hand():
    from nbsupport.attention import ReferenceLayerNorm, layer_norm

    x = torch.tensor([[1.0, 2.0, 4.0]])
    # mean 7/3; deviations -4/3, -1/3, 5/3; unbiased variance (16 + 1 + 25) / 9 / 2 = 7/3
    dev = torch.tensor([[-4 / 3, -1 / 3, 5 / 3]])
    ref = ReferenceLayerNorm(3)
    assert torch.allclose(ref(x), dev / ((7 / 3) ** 0.5 + 1e-6), atol=1e-6)
    # torch's LayerNorm: biased variance 14/9, eps inside the root
    assert torch.allclose(layer_norm(3, "torch")(x), dev / (14 / 9 + 1e-5) ** 0.5, atol=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([2.0, 2.0, 2.0]))
        ref.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(ref(x), 2 * dev / ((7 / 3) ** 0.5 + 1e-6) + torch.tensor([1.0, 0.0, -1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        layer_norm(3, "batch")


def _mha(h):  # 4 linear maps h -> h
    return 4 * (h * h + h)


def _ffn(h, ff):  # h -> ff -> h
    return (h * ff + ff) + (ff * h + h)


def _ln(n):
    return 2 * n


def test_paper_preset_parameter_counts_from_layer_sizes():
    from nbsupport.models.umons import paper_parameter_count

    h, ff, layers, seq, word, audio, video, n_out = 512, 1024, 4, 60, 300, 80, 512, 6
    lstm = 4 * h * (word + h) + 2 * 4 * h  # one LSTM layer: 4 gates, input + recurrent weights, two biases
    sa = _mha(h) + _ffn(h, ff) + 2 * _ln(h)  # self-attention block (two LayerNorms)
    sga = 2 * _mha(h) + _ffn(h, ff) + 3 * _ln(h)  # guided attention block (three LayerNorms)
    block_glimpse = (h * ff + ff) + (ff * seq + seq)  # glimpse MLP h -> ff -> 60 glimpses, no merge
    final_glimpse = (h * ff + ff) + (ff * 1 + 1) + (h * 2 * h + 2 * h)  # MLP h -> ff -> 1, merge h -> 2h
    head = _ln(2 * h) + (2 * h * n_out + n_out)  # LayerNorm(2h) + Linear(2h, 6)

    n_mod = 2  # LA: Model_LA
    expected_la = (lstm + (audio * h + h)
                   + layers * (sa + sga) + (layers - 1) * (n_mod * block_glimpse + n_mod * _ln(h))
                   + n_mod * final_glimpse + head)
    assert expected_la == 28_375_920
    assert paper_parameter_count("LA") == expected_la
    n_mod = 3  # LAV: Model_LAV
    expected_lav = (lstm + (audio * h + h) + (video * h + h)
                    + layers * (sa + 2 * sga) + (layers - 1) * (n_mod * block_glimpse + n_mod * _ln(h))
                    + n_mod * final_glimpse + head)
    assert expected_lav == 44_071_461
    assert paper_parameter_count("LAV") == expected_lav
    # the book's variant at the same sizes: glimpse MLPs of width h and a final glimpse/head of width h
    book = UmonsTransformer("LA", 6, config=BOOK_CONFIG_AT_PAPER_SIZES)
    glimpse_book = (h * h + h) + (h * seq + seq)
    final_book = (h * h + h) + (h + 1) + (h * h + h)
    expected_book = (lstm + (audio * h + h) + layers * (sa + sga) + (layers - 1) * (2 * glimpse_book + 2 * _ln(h))
                     + 2 * final_book + _ln(h) + (h * n_out + n_out))
    assert sum(p.numel() for p in book.parameters()) == expected_book
    assert paper_parameter_count("LA", config=BOOK_CONFIG_AT_PAPER_SIZES) == expected_book  # Chapter 4
    assert 0.09 < 1 - expected_book / expected_la < 0.11  # the book's variant has ~10 % fewer parameters


def test_paper_preset_sets_every_switch_to_the_reference():
    c = UmonsConfig.paper()
    assert (c.hidden_size, c.ff_size, c.layers, c.heads, c.dropout, c.seq_len) == (512, 1024, 4, 4, 0.1, 60)
    assert (c.block_residual, c.lang_from_block_input, c.glimpse_hidden, c.final_glimpse_mult, c.layernorm,
            c.mask_every_layer, c.zero_padding) == (True, True, "ff", 2, "reference", False, False)
    assert UmonsConfig.paper(hidden_size=16, heads=2).hidden_size == 16
    book = UmonsConfig()
    assert (book.block_residual, book.lang_from_block_input, book.glimpse_hidden, book.final_glimpse_mult,
            book.layernorm, book.mask_every_layer, book.zero_padding) == (False, False, "hidden", 1, "torch", True,
                                                                         True)
    for bad in (dict(glimpse_hidden="wide"), dict(layernorm="rms"), dict(block_residual=1),
                dict(final_glimpse_mult=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UmonsConfig(**bad)


class _Times(torch.nn.Module):
    """Stand-in sublayer stack: returns ``k * x`` and remembers the language it was given."""

    def __init__(self, k):
        super().__init__()
        self.k, self.seen = k, None

    def forward(self, y, y_mask, x=None, x_mask=None):
        self.seen = None if x is None else x.detach().clone()
        return self.k * y


def _capture_final_input(model, m):
    store = {}
    model.final_glimpse[m].register_forward_pre_hook(lambda mod, args: store.__setitem__("x", args[0].detach()))
    return store


@pytest.mark.parametrize("block_residual, lang_from_input", [(False, False), (True, False), (False, True),
                                                              (True, True)])
def test_block_residual_and_language_of_the_block_input_by_hand(block_residual, lang_from_input):
    # one layer, sublayer stacks replaced by k * x: language block 2x, audio co-attention block 3y
    cfg = UmonsConfig(**{**SMALL, "layers": 1}, block_residual=block_residual, lang_from_block_input=lang_from_input)
    model = UmonsTransformer("LA", 6, config=cfg, input_dims=DIMS).eval()
    model.lang_blocks[0], model.co_blocks["A"][0] = _Times(2.0), _Times(3.0)
    store_l, store_a = _capture_final_input(model, "L"), _capture_final_input(model, "A")
    batch = _batch()
    with torch.no_grad():
        model(batch)
        x0, _ = model.adapters["L"](batch["text"], batch["text_mask"])
        y0, _ = model.adapters["A"](batch["audio"], batch["audio_mask"])
    r = 1.0 if block_residual else 0.0
    assert torch.allclose(store_l["x"], (2 + r) * x0, atol=1e-6)  # x = SA(x) (+ x)
    assert torch.allclose(store_a["x"], (3 + r) * y0, atol=1e-6)  # y = SGA(y, x) (+ y)
    lang_seen = model.co_blocks["A"][0].seen
    assert torch.allclose(lang_seen, x0 if lang_from_input else (2 + r) * x0, atol=1e-6)


def test_glimpse_sizes_follow_the_switches():
    cfg = UmonsConfig(**SMALL, glimpse_hidden="ff", final_glimpse_mult=2, layernorm="reference")
    model = UmonsTransformer("LA", 6, config=cfg, input_dims=DIMS)
    assert model.block_glimpses["A"][0].mlp[0].out_features == SMALL["ff_size"]
    assert model.final_glimpse["L"].mlp[0].out_features == SMALL["ff_size"]
    assert model.final_glimpse["L"].proj.out_features == 2 * SMALL["hidden_size"]
    assert model.classifier.in_features == 2 * SMALL["hidden_size"]
    from nbsupport.attention import ReferenceLayerNorm
    assert isinstance(model.norm, ReferenceLayerNorm) and model.norm.weight.shape == (2 * SMALL["hidden_size"],)
    assert isinstance(model.lang_blocks[0].norm1, ReferenceLayerNorm)
    assert isinstance(model.co_blocks["A"][0].norms[2], ReferenceLayerNorm)
    assert model.eval()(_batch()).shape == (3, 6)


def test_masks_in_the_first_layer_only_as_the_reference():
    batch = _batch()
    for every in (True, False):
        torch.manual_seed(0)
        model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL, mask_every_layer=every).eval()
        with torch.no_grad():
            model(batch)
        maps = model.attention_maps()
        sa = maps["self_attention"]["L"]  # per layer (B, heads, T, T)
        # example 1 has 3 real words: its padded keys get weight 0 in a masked layer
        w0 = sa[0][1][..., 3:]
        w1 = sa[1][1][..., 3:]
        assert float(w0.abs().sum()) == 0.0
        assert (float(w1.abs().sum()) == 0.0) == every
        glimpse_on_pad = float(maps["glimpse"]["L"][1, 3:].sum())
        assert (glimpse_on_pad == 0.0) == every  # the reference's final glimpse has no mask


def test_zero_padding_false_zeroes_neither_inputs_nor_outputs():
    from nbsupport.models.umons import ModalityAdapter

    torch.manual_seed(0)
    ad = ModalityAdapter("A", 10, 16, 8, zero_padding=False)
    feats, mask = torch.randn(2, 5, 10), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out, m = ad(feats, mask)
    # the batch's padded rows (3, 4) are read as given; the 3 rows appended to reach seq_len 8 are zero
    # features, and Linear(0) is its bias
    assert torch.allclose(out[0, :5], ad.net(feats[0]), atol=1e-6)
    assert torch.allclose(out[0, 5:], ad.net.bias.expand(3, -1), atol=1e-6)
    assert torch.allclose(out[1, :5], ad.net(feats[1]), atol=1e-6)
    ad.zero_padding = True
    assert torch.all(ad(feats, mask)[0][0, 3:] == 0)


# ---- the reference code's bugs, each a switch (off by default, on in paper(reference_bugs=True)) ----
def test_all_masked_rows_uniform_as_the_reference_fill_by_hand():
    from nbsupport.attention import masked_softmax

    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    e1, e3 = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(3.0))
    real = torch.stack([e1 / (e1 + e3), torch.tensor(0.0), e3 / (e1 + e3)])
    book = masked_softmax(scores, mask)
    ref = masked_softmax(scores, mask, all_masked="uniform")
    assert torch.allclose(book[0], real) and torch.allclose(ref[0], real)  # same where a key is real
    assert torch.equal(book[1], torch.zeros(3))  # the book: no key, no weight
    assert torch.allclose(ref[1], torch.full((3,), 1 / 3))  # the reference's -1e9 fill: uniform
    with pytest.raises(ValueError, match="all_masked"):
        masked_softmax(scores, mask, all_masked="nan")


def test_all_masked_switch_in_the_model_gives_uniform_audio_glimpse():
    batch = _batch(lengths={"L": [5, 3, 7], "A": [8, 0, 6], "V": [4, 6, 1]})  # item 1: no audio at all
    for setting, expected in (("zero", torch.zeros(8)), ("uniform", torch.full((8,), 1 / 8))):
        torch.manual_seed(0)
        model = UmonsTransformer("LA", 6, input_dims=DIMS, **SMALL, all_masked=setting).eval()
        with torch.no_grad():
            model(batch)
        assert torch.allclose(model.attention_maps()["glimpse"]["A"][1], expected, atol=1e-7)
        assert torch.allclose(model.co_blocks["A"][0].self_att.weights[1], expected[:8].expand(2, 8, 8), atol=1e-7)


def test_video_glimpse_masked_with_the_audio_mask_as_model_lav():
    # item 0: audio 2 real frames, video 5: the reference masks the video glimpse with the audio mask
    batch = _batch(lengths={"L": [5, 3, 7], "A": [2, 8, 6], "V": [5, 6, 1]}, pad_to=8)
    out = {}
    for setting in ("video", "audio"):
        torch.manual_seed(0)
        model = UmonsTransformer("LAV", 6, input_dims=DIMS, **SMALL, video_glimpse_mask=setting).eval()
        with torch.no_grad():
            out[setting] = model(batch)
        w = model.block_glimpses["V"][0].weights[0]  # (glimpses, T) of item 0
        real = (w[:, :2] if setting == "audio" else w[:, :5]).sum(-1)
        assert torch.allclose(real, torch.ones(w.shape[0]), atol=1e-6)  # all mass on the mask's positions
        if setting == "audio":  # video frames 2-4 are real but get no weight; item 2: frames 1-5 get weight
            assert float(w[:, 2:5].abs().sum()) == 0.0
            assert float(model.block_glimpses["V"][0].weights[2][:, 1:6].sum()) > 0
    assert not torch.allclose(out["video"], out["audio"])
    # equal lengths: the two masks are the same and so are the logits
    same = _batch(lengths={"L": [5, 3, 7], "A": [4, 6, 1], "V": [4, 6, 1]})
    logits = []
    for setting in ("video", "audio"):
        torch.manual_seed(0)
        model = UmonsTransformer("LAV", 6, input_dims=DIMS, **SMALL, video_glimpse_mask=setting).eval()
        with torch.no_grad():
            logits.append(model(same))
    assert torch.equal(logits[0], logits[1])


def test_learned_pad_token_is_what_the_lstm_reads_at_padded_positions():
    from nbsupport.models.umons import ModalityAdapter

    torch.manual_seed(0)
    ad = ModalityAdapter("L", 6, 8, 5, zero_padding=False, pad_token="learned")
    assert ad.pad_vector.shape == (6,)
    feats, mask = torch.randn(2, 3, 6), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out, _ = ad(feats, mask)
    # by hand: the LSTM's input has the pad vector at every padded position (2 given + 2 appended)
    x = torch.cat([feats, torch.zeros(2, 2, 6)], 1)
    real = torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], 1)
    x = torch.where(real[..., None], x, ad.pad_vector.detach())
    assert torch.allclose(out, ad.net(x)[0], atol=1e-6)
    out.sum().backward()
    assert ad.pad_vector.grad is not None and float(ad.pad_vector.grad.abs().sum()) > 0  # it is trained
    # the book's default reads zeros there, and only the language adapter has a pad token
    assert ModalityAdapter("L", 6, 8, 5).pad_vector is None
    assert ModalityAdapter("A", 6, 8, 5, pad_token="learned").pad_vector is None


def test_paper_with_reference_bugs_turns_on_every_bug_and_nothing_else():
    from nbsupport.models.umons import REFERENCE_BUGS

    fixed, buggy = UmonsConfig.paper(), UmonsConfig.paper(reference_bugs=True)
    assert (fixed.video_glimpse_mask, fixed.pad_token, fixed.all_masked) == ("video", "zero", "zero")
    assert (buggy.video_glimpse_mask, buggy.pad_token, buggy.all_masked) == ("audio", "learned", "uniform")
    diff = {k for k, v in dataclasses.asdict(buggy).items() if dataclasses.asdict(fixed)[k] != v}
    assert diff == set(REFERENCE_BUGS)
    assert UmonsConfig().video_glimpse_mask == "video"  # the book's default is fixed
    for bad in (dict(video_glimpse_mask="text"), dict(pad_token="unk"), dict(all_masked="nan")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UmonsConfig(**bad)
    # the buggy preset has one more parameter vector: the pad token (300-d GloVe input)
    n_fixed = sum(p.numel() for p in UmonsTransformer("LA", 6, config=UmonsConfig.paper()).parameters())
    n_buggy = sum(p.numel() for p in UmonsTransformer("LA", 6, config=buggy).parameters())
    assert n_buggy - n_fixed == 300


def test_bug_cost_pairs_seeds_from_the_same_start_and_its_interval_is_over_seeds():
    from torch.utils.data import DataLoader

    from nbsupport import protocol
    from nbsupport.evidence import seed_interval

    batches = [_batch(lengths={"L": [5, 3, 7], "A": [2, 8, 6], "V": [5, 6, 1]}, seed=s, pad_to=8) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    starts = []
    real_fit = protocol.train_and_test

    def spy(model, *args, **kw):  # the initial weights each training starts from
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_fit(model, *args, **kw)

    protocol.train_and_test = spy
    try:
        cost = protocol.umons_bug_cost(loaders, UmonsConfig(**SMALL), {"video_glimpse_mask": "audio"},
                                       seeds=[0, 1, 2], epochs=1, lr=1e-2, device="cpu", progress=False)
    finally:
        protocol.train_and_test = real_fit
    assert [r["seed"] for r in cost["per_seed"]] == [0, 1, 2] and len(starts) == 6
    for fixed, bug in zip(starts[0::2], starts[1::2]):  # per seed: the same initial weights
        assert all(torch.equal(fixed[k], bug[k]) for k in fixed)
    assert not torch.equal(starts[0]["classifier.weight"], starts[2]["classifier.weight"])  # seeds differ
    d = seed_interval([r["bug"] for r in cost["per_seed"]], [r["fixed"] for r in cost["per_seed"]])
    assert cost["difference"]["value"] == pytest.approx(d.value) and cost["difference"]["n_seeds"] == 3
    low = cost["difference"]["low"]
    assert (low is None and d.low != d.low) or low == pytest.approx(d.low)  # null, not NaN, without spread
    assert "paired by seed over 3 seeds" in cost["sentence"]
    with pytest.raises(ValueError, match="seeds"):
        protocol.reference_bug_cost(lambda bug: None, loaders, seeds=[1, 1], epochs=1, lr=1e-2)


def test_train_seeds_trains_each_method_per_seed_once_and_pairs_them():
    from torch.utils.data import DataLoader

    from nbsupport import protocol
    from nbsupport.models import umons

    batches = [_batch(lengths={"L": [5, 3, 7], "A": [2, 8, 6], "V": [5, 6, 1]}, seed=s, pad_to=8) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    dims = umons.input_dims_from(batches[0])
    builders = {m: (lambda m=m: umons.UmonsTransformer(m, 6, config=UmonsConfig(**SMALL), input_dims=dims))
                for m in ("L", "LA")}
    starts = []
    real_fit = protocol.train_and_test

    def spy(model, *args, **kw):
        starts.append((kw["name"], kw["seed"], model.state_dict()["classifier.weight"].clone()))
        return real_fit(model, *args, **kw)

    protocol.train_and_test = spy
    try:
        first = protocol.train_seeds({"L": builders["L"]}, loaders, [0], epochs=1, lr=1e-2, device="cpu",
                                     progress=False)
        runs = protocol.train_seeds(builders, loaders, [0, 1], epochs=1, lr=1e-2, device="cpu",
                                    progress=False, runs=first)
    finally:
        protocol.train_and_test = real_fit
    # ("L", 0) was in the runs already: trained once; every other (method, seed) once
    assert [(n, s) for n, s, _ in starts] == [("L", 0), ("LA", 0), ("L", 1), ("LA", 1)]
    torch.manual_seed(1)
    assert torch.equal(starts[2][2], builders["L"]().state_dict()["classifier.weight"])  # seed -> init
    table = runs.table()
    assert list(zip(table["model"], table["seed"])) == [("L", 0), ("L", 1), ("LA", 0), ("LA", 1)]
    assert "valid_wacc" in table and set(runs.test) == {"L", "LA"}
    verdict = runs.compare("LA", "L")
    assert verdict.seeds == (0, 1) and verdict.as_dict()["n_seeds"] == 2
    with pytest.raises(ValueError, match="distinct"):
        protocol.train_seeds(builders, loaders, [1, 1], epochs=1, lr=1e-2)


def test_umons_verdicts_reuse_the_chapters_run_and_pair_the_bug_with_lav_per_seed():
    """Chapter 4's verdicts (protocol.umons_verdicts): a run made by train_umons is the seed run (same
    predictions when trained again), the bug model starts from that seed's L+A+V weights, and a bug seed
    outside ``seeds`` trains L+A+V too."""
    import numpy as np
    from torch.utils.data import DataLoader

    from nbsupport import protocol

    batches = [_batch(lengths={"L": [5, 3, 7], "A": [2, 8, 6], "V": [5, 6, 1]}, seed=s, pad_to=8) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    cfg = UmonsConfig(**{**SMALL, "dropout": 0.2})
    kw = dict(config=cfg, epochs=2, lr=1e-2, device="cpu", progress=False)
    row, res = protocol.train_umons("LAV", loaders, seed=0, **kw)  # the chapter's own run
    runs = protocol.SeedRuns("wacc")
    runs.add("LAV", 0, row, res)
    starts = []
    real_fit = protocol.train_and_test

    def spy(model, *args, **k):
        starts.append((k["name"], k["seed"], {n: v.clone() for n, v in model.state_dict().items()}))
        return real_fit(model, *args, **k)

    protocol.train_and_test = spy
    try:
        runs, verdicts = protocol.umons_verdicts(loaders, cfg, ["L", "A", "LA", "LAV"], seeds=[0, 1],
                                                 bug_seeds=[0, 1, 2], bug={"video_glimpse_mask": "audio"},
                                                 runs=runs, **{k: v for k, v in kw.items() if k != "config"})
    finally:
        protocol.train_and_test = real_fit
    bug = protocol.UMONS_BUG_NAME
    trained = [(n, s) for n, s, _ in starts]
    assert ("LAV", 0) not in trained and trained.count(("LAV", 1)) == 1 and ("LAV", 2) in trained
    assert {s for n, s in trained if n == bug} == {0, 1, 2}
    weights = {(n, s): w for n, s, w in starts}
    torch.manual_seed(0)
    lav0 = protocol.build_umons("LAV", loaders, config=cfg).state_dict()
    for s in (0, 1, 2):  # the bug model starts where that seed's L+A+V starts
        lav = lav0 if s == 0 else weights[("LAV", s)]
        assert all(torch.equal(lav[k], weights[(bug, s)][k]) for k in lav)
    again, res1 = protocol.train_umons("LA", loaders, seed=1, **kw)  # the same run as the seed run
    assert np.array_equal(res1.extra["test"].decisions, runs.test["LA"][1].decisions)
    assert set(verdicts) == {"fusion_gain", "vision_gain", "video_mask_bug"}
    fusion = verdicts["fusion_gain"]
    mean_valid = {m: np.mean([runs.valid[m][s] for s in (0, 1)]) for m in runs.valid}
    assert fusion.a == max(["LA", "LAV"], key=mean_valid.get)  # chosen on validation, over seeds
    assert fusion.b == max(["L", "A"], key=mean_valid.get) and fusion.seeds == (0, 1)
    assert verdicts["vision_gain"].seeds == (0, 1) and (verdicts["vision_gain"].a, verdicts["vision_gain"].b) == \
        ("LAV", "LA")
    assert verdicts["video_mask_bug"].seeds == (0, 1, 2) and verdicts["video_mask_bug"].b == "LAV"
    assert verdicts["video_mask_bug"].as_dict()["decision"] in (bug, "LAV", "undecided")
