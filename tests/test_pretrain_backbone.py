"""experiments/pretrain_backbone.py: the cells' labels are what each cell holds, and the saved ResNet is one that
train.py --resnet loads."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import pretrain_backbone  # noqa: E402
import soho  # noqa: E402
import synthetic  # noqa: E402


def test_cell_labels_name_the_colour_and_kind_of_each_shape_in_its_cells():
    red_star = synthetic.Thing("star", "red", "small", 32, 32, 20, (215, 45, 45))  # inside cell (0, 0)
    blue_circle = synthetic.Thing("circle", "blue", "big", 192, 128, 40, (45, 85, 215))  # on the cells' corner
    scene = synthetic.Scene(256, 256, "olive", (110, 110, 20), (red_star, blue_circle))
    labels = pretrain_backbone.cell_labels([scene], (4, 4))
    assert labels.shape == (1, 16, 11)
    colours, shapes = pretrain_backbone.COLOURS, pretrain_backbone.SHAPES
    for r in range(4):
        for c in range(4):
            want = torch.zeros(11)
            if (r, c) == (0, 0):
                want[colours.index("red")] = want[6 + shapes.index("star")] = 1
            if (r, c) in ((1, 2), (1, 3), (2, 2), (2, 3)):  # (192, 128) is where these four cells meet
                want[colours.index("blue")] = want[6 + shapes.index("circle")] = 1
            assert torch.equal(labels[0, 4 * r + c], want), (r, c)


def test_a_short_run_writes_a_resnet_that_train_py_loads(tmp_path):
    out = str(tmp_path / "resnet.pt")
    pretrain_backbone.main(["--steps", "2", "--batch", "2", "--out", out])
    backbone = pretrain_backbone.backbone_of(soho.PRESETS["tiny"])
    soho.load_resnet_weights(backbone, out)  # every key, every shape, or an error
    saved = torch.load(out, weights_only=True)
    assert torch.equal(backbone.conv1.weight, saved["conv1.weight"])
    assert not any(k.startswith("fc.") for k in saved)


def test_a_fixed_head_has_unit_rows_no_bias_and_is_not_trained():
    backbone = pretrain_backbone.backbone_of(soho.PRESETS["tiny"])
    head = pretrain_backbone.head_of(backbone, fixed=True)
    rows = len(synthetic.SYNTH_BACKGROUNDS) + len(synthetic.SYNTH_COLORS) + len(synthetic.SYNTH_SHAPES)  # 8 + 6 + 5
    assert head.weight.shape == (rows, backbone.out_channels)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(rows))
    assert (head.bias == 0).all() and not any(p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in pretrain_backbone.head_of(backbone).parameters())


def test_a_run_on_a_world_variant_draws_its_scenes_and_restores_synthetic(tmp_path, monkeypatch):
    drawn, plain = [], synthetic.random_scene
    out = str(tmp_path / "resnet.pt")

    def recording_cell_losses(backbone, head, scenes, cfg):
        drawn.extend(scenes)
        return real_cell_losses(backbone, head, scenes, cfg)
    real_cell_losses = pretrain_backbone.cell_losses
    monkeypatch.setattr(pretrain_backbone, "cell_losses", recording_cell_losses)
    pretrain_backbone.main(["--steps", "1", "--batch", "40", "--world", "close-ups", "--out", out])
    assert synthetic.random_scene is plain
    assert any(t.r >= 80 for s in drawn for t in s.things)  # close-ups: radius 80-110, never drawn by synthetic.py
    assert os.path.isfile(out)
