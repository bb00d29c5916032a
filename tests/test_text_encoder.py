"""Tests of the pretrained text encoder wrapper (nbsupport.models.text, Chapters 5-6): the CLS vector
equals the [CLS] row of the Hugging Face model loaded independently; nothing is downloaded."""
import pytest
import torch
from transformers import AutoModel

from nbsupport.models.text import TextEncoder, bundled_text_model_path, load_tokenizer, tokenize

TEXTS = ["I am so happy to see you", "this is terrible"]


def test_bundled_minilm_cls_matches_transformers():
    tok = load_tokenizer()
    batch = tokenize(tok, TEXTS, max_len=50)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"][0, 0] == tok.cls_token_id
    enc = TextEncoder().eval()
    ref = AutoModel.from_pretrained(str(bundled_text_model_path())).eval()
    with torch.no_grad():
        out = enc(**batch)
        expect = ref(**batch).last_hidden_state[:, 0]
    assert out.shape == (2, 384) and enc.hidden_size == 384
    torch.testing.assert_close(out, expect)


def test_tiny_encoder_same_code_path():
    tok = load_tokenizer()
    enc = TextEncoder(tiny=True)
    out = enc(**tokenize(tok, TEXTS))
    assert out.shape == (2, enc.hidden_size) and enc.hidden_size == 32
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_local_folder_accepted():
    enc = TextEncoder(str(bundled_text_model_path()))
    assert enc.hidden_size == 384


def test_missing_model_names_the_parameter():
    with pytest.raises(RuntimeError, match="name_or_path"):
        TextEncoder("no-such-org/no-such-model-xyz")
    with pytest.raises(RuntimeError, match="name_or_path"):
        load_tokenizer("no-such-org/no-such-model-xyz")


def test_bad_input_shape():
    enc = TextEncoder(tiny=True)
    with pytest.raises(ValueError, match="input_ids"):
        enc(torch.ones(5, dtype=torch.long))
