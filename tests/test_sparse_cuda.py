"""The spconv (CUDA) backend of nbsupport.sparse against dense convolution: runs only where a CUDA GPU and
spconv-cu12x are present (skipped on CPU CI). The CPU path is covered by tests/test_sparse.py."""
import pytest
import torch
import torch.nn.functional as F

from nbsupport import sparse

# skip on spconv being absent, not on the backend choice: a GPU where spconv fails its self-check must
# fail these tests rather than skip them
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not sparse.backends._spconv_available(),
                                reason="needs a CUDA GPU with spconv-cu12x installed")
DEV = "cuda"


@pytest.fixture(autouse=True)
def _full_fp32():
    """The dense reference in full fp32 (no TF32), so the comparison measures spconv, not cuDNN's rounding."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _case(batch, c_in, h, w, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, h, w, generator=g) < density
    mask[0, 0, 0] = True
    dense = torch.randn(batch, c_in, h, w, generator=g) * mask[:, None]
    return dense.to(DEV), mask.to(DEV)


@pytest.mark.parametrize("batch,c_in,c_out,h,w,density", [
    (1, 2, 3, 4, 4, 1.0), (2, 4, 8, 8, 8, 0.5), (4, 64, 128, 12, 12, 0.3), (8, 16, 32, 16, 4, 0.05),
    (3, 32, 32, 9, 7, 0.8)])
def test_spconv_subm_conv_matches_dense_forward_backward(batch, c_in, c_out, h, w, density):
    dense, mask = _case(batch, c_in, h, w, density, seed=c_in + h)
    conv = sparse.SubMConv2d(c_in, c_out, 3).to(DEV)
    x = sparse.to_sparse(dense, mask)
    feats = x.features.detach().requires_grad_(True)
    out = conv(x.replace(feats))
    assert conv.last_backend == "spconv"
    dense_in = dense.detach().requires_grad_(True)
    ref = F.conv2d(dense_in, conv.weight, padding=1) * mask[:, None]
    torch.testing.assert_close(out.dense(), ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(ref) * mask[:, None]
    (ref * grad).sum().backward()
    w_grad_ref = conv.weight.grad.clone()
    conv.weight.grad = None
    (out.dense() * grad).sum().backward()
    torch.testing.assert_close(feats.grad, dense_in.grad.permute(0, 2, 3, 1)[mask], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(conv.weight.grad, w_grad_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_sparse_max_pool_on_cuda_matches_dense(density):
    """SparseMaxPool2d runs in PyTorch on every device (spconv's pool is not used): checked on CUDA here."""
    dense, mask = _case(2, 8, 8, 8, density, seed=7)
    pooled = sparse.SparseMaxPool2d(2)(sparse.to_sparse(dense, mask))
    ref = F.max_pool2d(dense.masked_fill(~mask[:, None], float("-inf")), 2)
    ref_mask = F.max_pool2d(mask[:, None].float(), 2)[:, 0] > 0
    assert pooled.num_sites == int(ref_mask.sum())
    got = pooled.dense(fill=float("-inf"))
    torch.testing.assert_close(got[ref_mask[:, None].expand_as(got)], ref[ref_mask[:, None].expand_as(ref)])


def test_sparse_block_on_spconv_equals_dense_block_at_full_density():
    torch.manual_seed(0)
    dense_block = sparse.DenseVggBlock(16, 32).to(DEV).eval()
    sparse_block = sparse.SparseVggBlock(16, 32).to(DEV).eval()
    sparse_block.load_state_dict(dense_block.state_dict())
    x = torch.randn(4, 16, 12, 12, device=DEV)
    out = sparse_block(sparse.to_sparse(x))
    torch.testing.assert_close(out.dense(), dense_block(x), atol=1e-4, rtol=1e-4)


def test_spconv_passes_its_selfcheck_and_is_the_backend():
    """The guard that decides whether spconv may run on this GPU (nbsupport.sparse.spconv_selfcheck)."""
    assert sparse.spconv_selfcheck(DEV) <= 1e-4
    assert sparse.sparse_backend(DEV) == "spconv"
    assert "self-check" in sparse.backend_description(DEV)
