"""experiments/oracle_tokens.py: the perfect visual tokens are what they claim to be, and a short run scores
every kind of held-out text."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import oracle_tokens  # noqa: E402
import synthetic  # noqa: E402


def test_a_cell_holds_its_background_and_exactly_the_shapes_that_reach_it():
    torch.manual_seed(0)
    oracle = oracle_tokens.OracleTokens(8)
    red_star = synthetic.Thing("star", "red", "small", x=20, y=20, r=18, rgb=(215, 45, 45))
    scene = synthetic.Scene(width=320, height=256, background="olive", bg_rgb=(110, 110, 20), things=(red_star,))
    features, valid, grid = oracle([scene])
    assert grid == (4, 5) and valid.all()
    olive = oracle.background.weight[oracle.backgrounds.index("olive")]
    red = oracle.colour.weight[oracle_tokens.COLOURS.index("red")]
    star = oracle.shape.weight[oracle_tokens.SHAPES.index("star")]
    with torch.no_grad():
        torch.testing.assert_close(features[0, 0], olive + red + star)  # the star's cell, (0, 0)
        for i in range(1, 20):  # every other cell shows the background alone
            torch.testing.assert_close(features[0, i], olive)


def test_a_short_run_scores_matched_both_kinds_of_mismatch_and_colour_mlm(world):
    scores = oracle_tokens.main(["--steps", "3", "--eval_every", "3", "--vocab", os.path.join(world, "vocab.txt")])
    assert set(scores) == {"matched", "other background", "same background", "colour MLM own", "colour MLM other",
                           "colour MLM none"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_cell_pixel_tokens_are_an_mlp_of_each_cells_block_colours():
    scene = synthetic.Scene(320, 256, "olive", (110, 110, 20), ())
    tokens = oracle_tokens.CellPixelTokens(8)
    features, valid, grid = tokens([scene, scene._replace(width=256)])
    assert grid == (4, 5) and features.shape == (2, 20, 8)
    assert valid[0].all() and valid[1].view(4, 5)[:, :4].all() and not valid[1].view(4, 5)[:, 4].any()
    images, _ = synthetic.scene_batch([scene], 256, 384)
    block = images[0, :, :16, :16].mean((1, 2))  # a plain olive image: every block is the same colour
    torch.testing.assert_close(features[0, 7], tokens.mlp(block.repeat_interleave(16)), atol=1e-5, rtol=1e-5)
    fine, fine_valid, fine_grid = oracle_tokens.CellPixelTokens(8, cell=32)([scene])
    assert fine_grid == (8, 10) and fine.shape == (1, 80, 8) and fine_valid.all()


def test_a_short_run_on_cell_pixels_scores_the_same_things(world):
    scores = oracle_tokens.main(["--steps", "2", "--eval_every", "2", "--tokens", "cell-pixels",
                                 "--vocab", os.path.join(world, "vocab.txt")])
    assert set(scores) == {"matched", "other background", "same background", "colour MLM own", "colour MLM other",
                           "colour MLM none"}


def test_object_scale_scales_the_shapes_embeddings_only():
    torch.manual_seed(0)
    plain = oracle_tokens.OracleTokens(8)
    torch.manual_seed(0)
    quiet = oracle_tokens.OracleTokens(8, object_scale=0.2)
    assert torch.equal(plain.background.weight, quiet.background.weight)
    torch.testing.assert_close(quiet.colour.weight, 0.2 * plain.colour.weight)
    torch.testing.assert_close(quiet.shape.weight, 0.2 * plain.shape.weight)


def plain_scene():
    red_star = synthetic.Thing("star", "red", "small", x=20, y=20, r=18, rgb=(215, 45, 45))
    return synthetic.Scene(width=320, height=256, background="olive", bg_rgb=(110, 110, 20), things=(red_star,))


def test_offset_shifts_every_real_cell_by_one_vector_and_noise_adds_fresh_numbers():
    torch.manual_seed(0)
    plain = oracle_tokens.OracleTokens(64)
    torch.manual_seed(0)
    shifted = oracle_tokens.OracleTokens(64, offset=1.5, noise=0.5)
    assert torch.equal(plain.background.weight, shifted.background.weight)  # the offset is drawn after them
    scenes = [plain_scene(), plain_scene()._replace(width=256)]
    base, valid, _ = plain(scenes)
    with torch.no_grad():
        noisy, _, _ = shifted(scenes)
        again, _, _ = shifted(scenes)
    assert not torch.equal(noisy, again)  # noise is drawn at every forward
    difference = (noisy - base)[valid] - shifted.offset  # [n, 64]: the noise alone
    assert abs(difference.std().item() - 0.5) < 0.05 and abs(difference.mean().item()) < 0.05
    assert (noisy[~valid] == 0).all()  # cells beyond a scene's own size stay empty


def test_centred_takes_each_images_mean_share_out_and_scaled_multiplies():
    torch.manual_seed(0)
    tokens = oracle_tokens.OracleTokens(8)
    scenes = [plain_scene(), plain_scene()._replace(width=256, background="sky")]
    base, valid, grid = tokens(scenes)
    for share in (1.0, 0.8):
        centred, c_valid, c_grid = oracle_tokens.Centred(tokens, share)(scenes)
        assert torch.equal(c_valid, valid) and c_grid == grid
        for b in range(2):
            mean = base[b][valid[b]].mean(0)
            torch.testing.assert_close(centred[b][valid[b]], base[b][valid[b]] - share * mean)
        assert (centred[~valid] == 0).all()
    scaled, _, _ = oracle_tokens.Scaled(tokens, 3.0)(scenes)
    torch.testing.assert_close(scaled, 3.0 * base)


def test_resnet_tokens_are_eq1_of_a_frozen_resnet_in_eval_mode(tmp_path):
    cfg = oracle_tokens.soho.PRESETS["tiny"]
    torch.manual_seed(0)
    source = oracle_tokens.soho.ResNet(cfg.resnet_depth, cfg.resnet_width, cfg.backbone_bn,
                                       zero_init_residual=cfg.zero_init_residual)
    path = str(tmp_path / "resnet.pt")
    torch.save(source.state_dict(), path)
    tokens = oracle_tokens.ResNetTokens(16, path, cfg).train()
    assert not tokens.backbone.training and tokens.projection.training
    assert not any(p.requires_grad for p in tokens.backbone.parameters())
    scenes = [plain_scene(), plain_scene()._replace(width=256)]
    features, valid, grid = tokens(scenes)
    images, image_mask = synthetic.scene_batch(scenes, cfg.image_short, cfg.image_long)
    expected = oracle_tokens.soho.encode(images, image_mask, source.eval(), tokens.projection)
    torch.testing.assert_close(features, expected[0])
    assert torch.equal(valid, expected[1]) and grid == expected[2]
    # standardised: each channel has mean 0 and deviation 1 over the batch's real cells before the projection
    standard = oracle_tokens.ResNetTokens(source.out_channels, path, cfg, standardise=True)
    with torch.no_grad():
        standard.projection.weight.copy_(torch.eye(source.out_channels)[..., None, None])
        standard.projection.bias.zero_()
    out, valid, _ = standard(scenes)
    raw, _, _ = oracle_tokens.soho.encode(images, image_mask, source, torch.nn.Identity())
    live = out[valid][:, raw[valid].std(0) > 1e-2]  # channels that vary over the cells well beyond the 1e-5 guard
    torch.testing.assert_close(live.mean(0), torch.zeros(live.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(live.std(0), torch.ones(live.shape[1]), atol=1e-3, rtol=0)


def test_disc_coverage_is_the_share_of_the_cell_inside_the_disc():
    inside = synthetic.Thing("circle", "red", "small", x=32, y=32, r=20, rgb=None)
    assert abs(oracle_tokens.disc_coverage(inside, 0, 0, samples=64) - 3.14159 * 20 ** 2 / 64 ** 2) < 0.01
    assert oracle_tokens.disc_coverage(inside, 2, 2) == 0.0
    covering = inside._replace(r=100)
    assert oracle_tokens.disc_coverage(covering, 0, 0) == 1.0


def test_graded_and_variant_tokens_scale_or_swap_the_shapes_vectors():
    scene = plain_scene()  # a red star of radius 18 at (20, 20): cell (0, 0) only
    torch.manual_seed(0)
    graded = oracle_tokens.OracleTokens(8, graded=True)
    features, _, _ = graded([scene])
    olive = graded.background.weight[graded.backgrounds.index("olive")]
    red = graded.colour.weight[oracle_tokens.COLOURS.index("red")]
    star = graded.shape.weight[oracle_tokens.SHAPES.index("star")]
    w = oracle_tokens.disc_coverage(scene.things[0], 0, 0) * 64 ** 2 / (3.14159265 * 22 ** 2)
    with torch.no_grad():
        torch.testing.assert_close(features[0, 0], olive + w * (red + star))
    varied = oracle_tokens.OracleTokens(8, variants=4)
    assert varied.colour.weight.shape == (24, 8) and varied.shape.weight.shape == (20, 8)
    olive = varied.background.weight[varied.backgrounds.index("olive")]
    i, k = oracle_tokens.COLOURS.index("red"), oracle_tokens.SHAPES.index("star")
    seen = set()
    with torch.no_grad():
        for _ in range(40):
            cell = varied([scene])[0][0, 0]
            v = [v for v in range(4) if torch.allclose(cell, olive + varied.colour.weight[4 * i + v]
                                                             + varied.shape.weight[4 * k + v])]
            assert len(v) == 1  # one variant, the same for the colour and the kind
            seen.add(v[0])
    assert seen == {0, 1, 2, 3}


def test_single_cell_puts_a_shape_only_in_the_cell_of_its_centre():
    big = synthetic.Thing("circle", "blue", "big", x=70, y=70, r=40, rgb=(45, 85, 215))  # reaches cells (0..1, 0..1)
    scene = synthetic.Scene(width=256, height=256, background="olive", bg_rgb=(110, 110, 20), things=(big,))
    torch.manual_seed(0)
    spread, single = oracle_tokens.OracleTokens(8), oracle_tokens.OracleTokens(8, single_cell=True)
    single.load_state_dict(spread.state_dict())
    olive = spread.background.weight[spread.backgrounds.index("olive")]
    with torch.no_grad():
        everywhere, _, _ = spread([scene])
        once, _, _ = single([scene])
    assert [i for i in range(16) if not torch.equal(everywhere[0, i], olive)] == [0, 1, 4, 5]
    assert [i for i in range(16) if not torch.equal(once[0, i], olive)] == [5]  # (70, 70) lies in cell (1, 1)
    torch.testing.assert_close(once[0, 5], everywhere[0, 5])
    fine, fine_valid, fine_grid = oracle_tokens.OracleTokens(8, cell=32)([scene])  # a grid four times as fine
    assert fine_grid == (8, 8) and fine_valid.all()
    def reached(r, c):  # the disc comes within its radius of the 32-px cell's square
        dx, dy = max(32 * c - 70, 0, 70 - (32 * c + 31)), max(32 * r - 70, 0, 70 - (32 * r + 31))
        return (dx * dx + dy * dy) ** 0.5 < 40
    assert [i for i in range(64) if not torch.equal(fine[0, i], fine[0, 63])] == \
        [8 * r + c for r in range(8) for c in range(8) if reached(r, c)]  # 13 cells: 4 x 4 less three corners
