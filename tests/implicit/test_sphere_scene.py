"""The analytic sphere scene: exact ray-sphere hits and Lambertian shading, cameras, the train/test split."""

import math

import pytest
import torch

from cvzoo.implicit import hemisphere_poses, look_at, render_spheres, sphere_scene_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ray_sphere_hits_and_shading_closed_form():
    centers, radii = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([1.0, 0.5])
    colors = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    origins = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0], [5.0, 0.0, 3.0], [0.0, 3.0, 4.0]])
    directions = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.1, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    rgb, t = render_spheres(origins, directions, centers, radii, colors, light=(0.0, 0.0, 1.0), ambient=0.2,
                            background=(0.1, 0.1, 0.1))
    # straight down onto the top of sphere 0: distance 3 along d of length 2 is t = 1.5, normal +z
    assert t[0].item() == pytest.approx(1.5)
    torch.testing.assert_close(rgb[0], colors[0])  # n . l = 1: full light
    # the tilted ray: |o + t d|^2 = (0.1 t)^2 + (4 - t)^2 = 1 -> 1.01 t^2 - 8 t + 15 = 0, the nearer root
    t1 = (8 - math.sqrt(64 - 4 * 1.01 * 15)) / (2 * 1.01)
    assert t[1].item() == pytest.approx(t1, rel=1e-5)
    normal_z = 4.0 - t1  # the hit point's z on the unit sphere is its normal's z
    torch.testing.assert_close(rgb[1], colors[0] * (0.2 + 0.8 * normal_z))
    assert t[2].item() == pytest.approx(2.5)  # the small sphere from 3 above: 3 - 0.5
    assert math.isinf(t[3].item())  # passes beside both
    torch.testing.assert_close(rgb[3], torch.tensor([0.1, 0.1, 0.1]))


def test_look_at_is_an_opengl_camera_facing_the_target():
    eye = torch.tensor([[3.0, 1.0, 2.0], [0.0, -4.0, 0.5]])
    c2w = look_at(eye, target=(0.5, 0.0, 0.0))
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    assert torch.allclose(torch.det(rot), torch.ones(2))  # right-handed
    forward = -rot[:, :, 2]
    torch.testing.assert_close(forward, torch.nn.functional.normalize(torch.tensor([0.5, 0.0, 0.0]) - eye, dim=-1))
    assert (rot[:, 2, 1] > 0).all()  # camera y points up (world z)
    assert rot[:, 2, 0].abs().max() < 1e-6  # camera x stays horizontal
    torch.testing.assert_close(c2w[:, :3, 3], eye)


def test_poses_and_dataset_split():
    poses = hemisphere_poses(12, radius=4.0)
    assert poses.shape == (12, 4, 4)
    torch.testing.assert_close(poses[:, :3, 3].norm(dim=-1), torch.full((12,), 4.0))
    elevation = torch.rad2deg(torch.asin(poses[:, 2, 3] / 4))
    assert (elevation >= 15 - 1e-4).all() and (elevation <= 60 + 1e-4).all()
    views = sphere_scene_dataset(10, 12, 16)
    assert views.images.shape == (10, 3, 12, 16) and views.poses.shape == (10, 4, 4)
    assert views.images.min() >= 0 and views.images.max() <= 1
    assert (views.near, views.far) == (2.0, 6.0)
    assert views.focal == pytest.approx(8 / math.tan(math.radians(35 / 2)))
    lit = (views.images.sum(1) > 0).float().mean()
    assert 0.1 < lit < 0.9  # spheres in view, background around them
    train, test = views.split(2)
    assert len(train.images) == 8 and len(test.images) == 2
    train_eyes, test_eyes = train.poses[:, :3, 3], test.poses[:, :3, 3]
    assert torch.cdist(test_eyes, train_eyes).min() > 0.1  # held-out cameras are not training cameras
    rays, rgb = train.rays()
    assert rays.shape == (8 * 12 * 16, 6) and rgb.shape == (8 * 12 * 16, 3)
    torch.testing.assert_close(rgb[16 + 3], train.images[0, :, 1, 3])  # view 0, row 1, column 3
    with pytest.raises(ValueError, match=r"num_test must be < the number of views 10, got 10"):
        views.split(10)
    with pytest.raises(ValueError, match=r"num_views must be an int >= 1, got 0"):
        sphere_scene_dataset(0)
    with pytest.raises(ValueError, match=r"radius must be > 2"):
        sphere_scene_dataset(4, radius=1.5)
