"""nbsupport.flops against hand-computed multiply-accumulate counts."""
import torch
from torch import nn

from nbsupport import flops, sparse as sp


def test_dense_conv_and_linear_formulas():
    assert flops.dense_conv_macs(4, 5, 3, 8, 3) == 4 * 5 * 3 * 8 * 9
    assert flops.dense_conv_macs(2, 2, 4, 6, (1, 3), n_images=3, groups=2) == 3 * 2 * 2 * 2 * 6 * 3
    assert flops.linear_macs(7, 10, 4) == 280


def test_subm_conv_macs_hand_counted_rulebook():
    # sites of one 3x3 image: (0,0), (0,1), (2,2). 3x3 kernel neighbour pairs (centre included):
    # (0,0)<->(0,1) are neighbours: (0,0) sees 2, (0,1) sees 2, (2,2) sees only itself -> 5 pairs
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 2, 2]])
    assert flops.subm_conv_macs(coords, 4, 6, 3, spatial_shape=(3, 3), batch_size=1) == 5 * 4 * 6
    x = sp.SparseTensor(torch.zeros(3, 4), coords, (3, 3), 1)
    assert flops.subm_conv_macs(x, 4, 6) == 5 * 4 * 6
    # 1x1 kernel: one pair per site
    assert flops.subm_conv_macs(x, 4, 6, kernel_size=1) == 3 * 4 * 6


def test_full_grid_subm_equals_dense_minus_border():
    # on a full H x W grid a 3x3 submanifold conv skips exactly the zero-padding taps of the dense conv
    h, w, b = 5, 4, 2
    x = sp.to_sparse(torch.zeros(b, 2, h, w))
    pairs_per_image = sum((min(y + 1, h - 1) - max(y - 1, 0) + 1) * (min(xx + 1, w - 1) - max(xx - 1, 0) + 1)
                          for y in range(h) for xx in range(w))
    assert flops.subm_conv_macs(x, 2, 3) == b * pairs_per_image * 2 * 3


def test_counter_on_mixed_model():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 5, padding=2)
            self.block = sp.SparseVggBlock(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, img, mask):
            x = sp.to_sparse(self.stem(img), mask)
            y = self.block(x)
            return self.head(y.features)

    net = Net().eval()
    img = torch.randn(2, 1, 6, 6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = True  # 2 adjacent sites -> 4 pairs
    mask[1, 3, 3] = True  # isolated -> 1 pair
    table = flops.count_macs(net, img, mask)
    assert list(table["layer"]) == ["stem", "block.conv1.conv", "block.conv2.conv", "head"]
    assert list(table["kind"]) == ["conv2d", "subm_conv2d", "subm_conv2d", "linear"]
    expected = [2 * 6 * 6 * 1 * 4 * 25, 5 * 4 * 8, 5 * 8 * 8, 2 * 8 * 3]  # head: 2 pooled sites
    assert list(table["macs"]) == expected
    assert table["dense_macs"].iloc[1] == 2 * 6 * 6 * 4 * 8 * 9
    assert table["sites"].iloc[1] == 3
    s = flops.summarize_macs(table)
    assert s["macs"] == sum(expected)


def test_executed_macs_follow_the_cpu_plan():
    conv = sp.SubMConv2d(2, 3)
    x = sp.to_sparse(torch.randn(1, 2, 4, 4))  # full grid -> dense plan
    with flops.MacCounter(conv) as mc:
        conv(x)
    row = mc.table().iloc[0]
    assert conv.last_strategy == "dense"
    assert row["executed_macs"] == row["dense_macs"] == 16 * 2 * 3 * 9
    conv.strategy = "pairs"
    with flops.MacCounter(conv) as mc:
        conv(x)
    row = mc.table().iloc[0]
    assert row["executed_macs"] == row["macs"] == sum((min(y + 1, 3) - max(y - 1, 0) + 1) * (min(z + 1, 3) - max(z - 1, 0) + 1)
            for y in range(4) for z in range(4)) * 2 * 3
