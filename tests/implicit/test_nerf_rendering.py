"""Rays, samplers and volume rendering against closed forms and a pinhole projection written out by hand."""

import math

import pytest
import torch

from cvzoo.implicit import (
    get_rays,
    look_at,
    sample_hierarchical,
    sample_pdf,
    sample_stratified,
    volume_render,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _project(points: torch.Tensor, c2w: torch.Tensor, focal: float, height: int, width: int) -> torch.Tensor:
    """World points (N, 3) -> continuous (column, row) pixel coordinates of a pinhole camera looking down -z
    (pixel (i, j) covers [j, j + 1) x [i, i + 1))."""
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]  # R^T (p - t), row-vector form
    depth = -cam[:, 2]
    return torch.stack([focal * cam[:, 0] / depth + width / 2, -focal * cam[:, 1] / depth + height / 2], dim=-1)


def test_identity_camera_rays():
    origins, directions = get_rays(5, 5, 10.0, torch.eye(4))
    assert origins.shape == directions.shape == (5, 5, 3)
    assert torch.equal(origins, torch.zeros(5, 5, 3))
    torch.testing.assert_close(directions[2, 2], torch.tensor([0.0, 0.0, -1.0]))  # centre pixel: straight ahead
    torch.testing.assert_close(directions[0, 0], torch.tensor([-0.2, 0.2, -1.0]))  # top-left: left and up
    assert (directions[..., 2] == -1).all()


def test_rays_pass_through_the_pixels_they_belong_to():
    height, width, focal = 6, 8, 7.0
    c2w = torch.stack([look_at(torch.tensor([3.0, -2.0, 1.5])), look_at(torch.tensor([0.0, 4.0, 0.5]))])
    origins, directions = get_rays(height, width, focal, c2w[:, :3])  # (2, H, W, 3); a 3 x 4 matrix works
    assert origins.shape == (2, height, width, 3)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([cols + 0.5, rows + 0.5], dim=-1).reshape(-1, 2).float()
    for cam in range(2):
        torch.testing.assert_close(origins[cam].reshape(-1, 3), c2w[cam, :3, 3].expand(height * width, 3))
        for z in (1.0, 2.5):  # every point o + z d of the ray projects to the pixel centre, at depth z
            points = (origins[cam] + z * directions[cam]).reshape(-1, 3)
            torch.testing.assert_close(_project(points, c2w[cam], focal, height, width), centres)
            depth = ((points - c2w[cam, :3, 3]) @ -c2w[cam, :3, 2])
            torch.testing.assert_close(depth, torch.full_like(depth, z))
    # the optical axis of a look_at camera hits the target (the origin) at the distance |eye|
    _, d = get_rays(5, 5, 4.0, c2w[0])
    torch.testing.assert_close(c2w[0, :3, 3] + math.sqrt(3**2 + 2**2 + 1.5**2) * d[2, 2], torch.zeros(3),
                               atol=1e-5, rtol=0)


def test_stratified_samples():
    o, d = torch.zeros(4, 3), torch.tensor([[0.0, 0.0, -2.0]]).expand(4, 3)
    points, z = sample_stratified(o, d, 2.0, 6.0, 5, perturb=False)
    assert points.shape == (4, 5, 3) and z.shape == (4, 5)
    torch.testing.assert_close(z[0], torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(points[0, :, 2], -2 * z[0])
    _, z = sample_stratified(torch.zeros(20000, 3), torch.ones(20000, 3), 2.0, 6.0, 5, perturb=True)
    # strata between midpoints, clipped to [near, far]: [2, 2.5], [2.5, 3.5], ..., [5.5, 6]
    lower, upper = torch.tensor([2.0, 2.5, 3.5, 4.5, 5.5]), torch.tensor([2.5, 3.5, 4.5, 5.5, 6.0])
    assert ((z >= lower) & (z <= upper)).all()
    assert (z.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(z.mean(0), (lower + upper) / 2, atol=0.01, rtol=0)


def test_sample_pdf_inverts_a_piecewise_constant_cdf():
    bins = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    weights = torch.tensor([[0.2, 0.0, 0.8]])
    u = torch.linspace(0, 1, 10)  # the quantiles deterministic sampling uses (none at the ambiguous u = 0.2)
    # closed-form inverse CDF: [0, 0.2) -> [0, 1) linearly, [0.2, 1] -> [2, 4] linearly (the empty bin skipped)
    expected = torch.where(u < 0.2, u / 0.2, 2 + (u - 0.2) / 0.8 * 2)
    got = sample_pdf(bins, weights, 10, deterministic=True)
    assert got.shape == (1, 10)
    torch.testing.assert_close(got[0], expected, atol=1e-3, rtol=0)
    samples = sample_pdf(bins.expand(4, 4), weights.expand(4, 3), 20000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 20000)
    frac = torch.stack([(samples < 1).float().mean(), ((samples >= 1) & (samples < 2)).float().mean(),
                        (samples >= 2).float().mean()])
    torch.testing.assert_close(frac, torch.tensor([0.2, 0.0, 0.8]), atol=0.01, rtol=0)
    inside = samples[samples >= 2]
    assert inside.mean().item() == pytest.approx(3.0, abs=0.02)  # uniform within its bin
    with pytest.raises(ValueError, match="bins and weights must have shapes"):
        sample_pdf(bins, weights[:, :2], 4)
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 1, got 0"):
        sample_pdf(bins, weights, 0)


def test_hierarchical_samples_concentrate_on_the_weights():
    z = torch.linspace(2, 6, 17).expand(3, 17)
    weights = torch.zeros(3, 17)
    weights[:, 8] = 1.0  # all the mass at z = 4
    merged = sample_hierarchical(z, weights, 64, perturb=False)
    assert merged.shape == (3, 17 + 64)
    assert (merged.diff(dim=-1) >= 0).all()
    fine = merged[0][~torch.isin(merged[0], z[0])]
    assert ((fine > 3.87) & (fine < 4.13)).float().mean() > 0.95  # between the midpoints around z = 4


def test_constant_density_slab_matches_beer_lambert():
    length, sigma, n = 1.5, 0.8, 64
    z = torch.linspace(0.0, length, n + 1).expand(2, n + 1)
    dens = torch.full((2, n + 1), sigma)
    dens[:, -1] = 0.0  # nothing beyond the slab (the last interval is infinite)
    colour = torch.tensor([0.2, 0.5, 0.9])
    rgb = colour.expand(2, n + 1, 3)
    directions = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.2, -1.6]])  # |d| = 1 and 2: the path is twice as long
    out = volume_render(rgb, dens, z, directions)
    opacity = 1 - torch.exp(-sigma * length * directions.norm(dim=-1))
    torch.testing.assert_close(out.acc, opacity)
    torch.testing.assert_close(out.rgb, opacity[:, None] * colour)
    # w_i = T_i alpha_i with T_i = exp(-sigma |d| z_i)
    delta = length / n * directions.norm(dim=-1, keepdim=True)
    expected_w = torch.exp(-sigma * delta * torch.arange(n)) * (1 - math.exp(-1) ** (sigma * delta))
    torch.testing.assert_close(out.weights[:, :-1], expected_w)
    # expected depth of the discrete slab: sum_i z_i w_i
    torch.testing.assert_close(out.depth, (expected_w * z[:, :-1]).sum(-1))
    white = volume_render(rgb, dens, z, directions, white_background=True)
    torch.testing.assert_close(white.rgb, opacity[:, None] * colour + (1 - opacity[:, None]))


def test_one_opaque_sample_shows_its_colour_and_hides_the_rest():
    z = torch.linspace(2, 6, 8)[None]
    sigma = torch.zeros(1, 8)
    sigma[0, 3] = 1e4
    sigma[0, 5] = 3.0  # behind the opaque one: invisible
    rgb = torch.rand(1, 8, 3)
    out = volume_render(rgb, sigma, z, torch.tensor([[0.0, 0.0, -1.0]]))
    torch.testing.assert_close(out.rgb[0], rgb[0, 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.depth[0], z[0, 3])
    assert out.acc.item() == pytest.approx(1.0, abs=1e-6)
    assert out.weights[0, 4:].abs().max() < 1e-6


def test_weights_are_a_sub_probability_and_empty_space_is_transparent():
    z = torch.sort(torch.rand(50, 32) * 4 + 2).values
    out = volume_render(torch.rand(50, 32, 3), torch.rand(50, 32) * 5, z, torch.randn(50, 3))
    assert (out.weights >= 0).all() and (out.acc <= 1 + 1e-6).all()
    assert (out.rgb >= 0).all() and (out.rgb <= 1 + 1e-6).all()
    empty = volume_render(torch.rand(4, 16, 3), torch.zeros(4, 16), z[:4, :16], torch.randn(4, 3))
    assert torch.equal(empty.acc, torch.zeros(4)) and torch.equal(empty.rgb, torch.zeros(4, 3))


def test_validation():
    with pytest.raises(ValueError, match=r"near must be < far, got near=6.0, far=2.0"):
        sample_stratified(torch.zeros(2, 3), torch.ones(2, 3), 6.0, 2.0, 8)
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 1, got 0"):
        sample_stratified(torch.zeros(2, 3), torch.ones(2, 3), 2.0, 6.0, 0)
    with pytest.raises(ValueError, match=r"origins must be a tensor of shape \(\.\.\., 3\), got \(2, 2\)"):
        sample_stratified(torch.zeros(2, 2), torch.ones(2, 3), 2.0, 6.0, 4)
    with pytest.raises(ValueError, match=r"height must be an int >= 1, got 0"):
        get_rays(0, 4, 1.0, torch.eye(4))
    with pytest.raises(ValueError, match=r"focal must be a positive finite number \(in pixels\), got -1.0"):
        get_rays(4, 4, -1.0, torch.eye(4))
    with pytest.raises(ValueError, match=r"camera_to_world must have shape \(\.\.\., 3, 4\) or \(\.\.\., 4, 4\)"):
        get_rays(4, 4, 1.0, torch.eye(3))
    with pytest.raises(ValueError, match="expected rgb"):
        volume_render(torch.rand(2, 4, 3), torch.rand(2, 5), torch.rand(2, 5), torch.rand(2, 3))
