"""Augmentation (`distbelief.data.augment`) and the replica's batch feed (`data.feed`):
what each knob does to a sample, determinism in (seed, replica, step), the shape
checks and the config's one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distbelief.config import AugmentConfig
from distbelief.job import JobConfig, apply_options, load_config
from distbelief.data.augment import Augmenter, augment_generator
from distbelief.data.feed import ReplicaFeed
from distbelief.data.sampling import BatchStream, replica_indices
from distbelief.errors import UserError

SIGNAL, IMAGE = (2, 40), (3, 8, 9)


def gen(step: int = 0) -> torch.Generator:
    return augment_generator(seed=1, replica=0, step=step)


def test_off_by_default_and_the_identity():
    x = torch.randn(5, *SIGNAL)
    aug = Augmenter(AugmentConfig(), SIGNAL)
    assert not aug.enabled and aug(x, gen()) is x


def test_a_pure_function_of_seed_replica_and_step():
    x = torch.randn(16, *IMAGE)
    aug = Augmenter(AugmentConfig(shift=2, crop=2, flip=True, scale=0.2, noise=0.1, warp=1.5),
                    IMAGE)
    first = aug(x, augment_generator(3, 1, 7))
    assert torch.equal(first, aug(x.clone(), augment_generator(3, 1, 7)))
    for other in (augment_generator(3, 1, 8), augment_generator(3, 2, 7),
                  augment_generator(4, 1, 7)):
        assert not torch.equal(first, aug(x, other))


def test_the_result_does_not_depend_on_the_number_of_threads():
    x = torch.randn(64, *SIGNAL)
    aug = Augmenter(AugmentConfig(shift=3, scale=0.1, noise=0.05, warp=2.0, warp_smooth=9),
                    SIGNAL)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = aug(x, gen())
        torch.set_num_threads(2)
        two = aug(x, gen())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_shift_rolls_each_signal_by_at_most_shift():
    x = torch.randn(32, *SIGNAL)
    out = Augmenter(AugmentConfig(shift=3), SIGNAL)(x, gen())
    offsets = []
    for a, b in zip(x, out):
        [k] = [k for k in range(-3, 4) if torch.equal(torch.roll(a, k, dims=-1), b)]
        offsets.append(k)
    assert len(set(offsets)) > 3  # per-sample draws


def test_flat_signals_take_shift_too():
    x = torch.randn(8, 10)
    out = Augmenter(AugmentConfig(shift=2), (10,))(x, gen())
    assert all(any(torch.equal(torch.roll(a, k), b) for k in range(-2, 3))
               for a, b in zip(x, out))


def test_crop_is_a_zero_padded_translation_and_flip_mirrors():
    x = torch.rand(32, *IMAGE) + 1  # no zeros of its own
    out = Augmenter(AugmentConfig(crop=2), IMAGE)(x, gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        assert any(torch.equal(padded[i, :, oy:oy + 8, ox:ox + 9], out[i])
                   for oy in range(5) for ox in range(5))
    flipped = Augmenter(AugmentConfig(flip=True), IMAGE)(x, gen())
    same = [torch.equal(a, b) for a, b in zip(x, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(x, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_image_shift_rolls_along_height_and_width():
    x = torch.randn(16, *IMAGE)
    out = Augmenter(AugmentConfig(shift=2), IMAGE)(x, gen())
    assert all(any(torch.equal(torch.roll(a, (dy, dx), dims=(1, 2)), b)
                   for dy in range(-2, 3) for dx in range(-2, 3)) for a, b in zip(x, out))


def test_scale_and_noise():
    x = torch.ones(200, *SIGNAL)
    scaled = Augmenter(AugmentConfig(scale=0.25), SIGNAL)(x, gen())
    factors = scaled[:, 0, 0]
    assert torch.equal(scaled, factors.view(-1, 1, 1).expand_as(x))  # one factor per sample
    assert 0.75 <= factors.min() < 0.85 and 1.15 < factors.max() <= 1.25
    noisy = Augmenter(AugmentConfig(noise=0.5), SIGNAL)(x, gen()) - x
    assert abs(noisy.std().item() - 0.5) < 0.02 and abs(noisy.mean().item()) < 0.02


@pytest.mark.parametrize("shape", [SIGNAL, IMAGE])
def test_warp_moves_every_point_by_at_most_warp(shape):
    """Warping a ramp reads off the displacement: within `warp`, smooth, not zero."""
    ramp = torch.arange(shape[-1], dtype=torch.float32).expand(16, *shape).contiguous()
    out = Augmenter(AugmentConfig(warp=1.5, warp_smooth=6), shape)(ramp, gen())
    moved = out - ramp
    assert moved.abs().max() <= 1.5 + 1e-5
    assert moved.abs().amax(dim=tuple(range(1, moved.dim()))).min() > 0.1
    constant = torch.full((4, *shape), 2.5)
    assert torch.allclose(Augmenter(AugmentConfig(warp=3.0), shape)(constant, gen()), constant)


@pytest.mark.parametrize("knobs, shape, words", [
    ({"flip": True}, (1, 40), "augment.flip applies to images (C, H, W)"),
    ({"crop": 2}, (32,), "augment.crop applies to images"),
    ({"shift": 1}, (2, 3, 4, 5), "augment.shift applies to signals"),
    ({"warp": 1.0}, (2, 3, 4, 5), "augment.warp applies to signals"),
    ({"shift": 40}, (1, 40), "augment.shift 40 must be smaller than the samples' size 40"),
    ({"crop": 8}, (1, 8, 8), "augment.crop 8 must be smaller"),
])
def test_augmentation_that_does_not_fit_the_shape_is_refused(knobs, shape, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        Augmenter(AugmentConfig(**knobs), shape)
    assert "\n" not in str(info.value)
    Augmenter(AugmentConfig(noise=0.1, scale=0.1), (2, 3, 4, 5))  # these fit any shape


@pytest.mark.parametrize("data, words", [
    ({"augment": {"shift": -1}}, "augment.shift must be >= 0"),
    ({"augment": {"scale": 1.0}}, "augment.scale must be in [0, 1)"),
    ({"augment": {"noise": float("inf")}}, "augment.noise must be a finite number >= 0"),
    ({"augment": {"warp_smooth": 0}}, "augment.warp_smooth must be >= 1"),
    ({"augment": {"flip": 1}}, "flip must be true or false"),
    ({"augment": {"blur": 1}}, "unknown key 'blur'"),
    ({"data": {"prefetch": 8}}, "--prefetch 8 applies to data servers only"),
    ({"cluster": {"data_servers": 1}, "data": {"prefetch": 0}}, "--prefetch must be >= 1"),
    ({"cluster": {"data_servers": -1}}, "--data-servers must be >= 0"),
    ({"cluster": {"data_servers": 1, "shards": 2}, "model": {"partitions": 2}},
     "--data-servers 1 feeds unpartitioned replicas only"),
    ({"algorithm": "sandblaster", "cluster": {"data_servers": 1}},
     "--data-servers 1 means nothing for --algorithm sandblaster"),
    ({"algorithm": "sandblaster", "augment": {"noise": 0.1}},
     "augment.noise 0.1 means nothing for --algorithm sandblaster"),
])
def test_config_refuses_bad_data_serving_settings_in_one_line(data, words):
    with pytest.raises(UserError) as info:
        JobConfig.from_dict(data).validate()
    assert words in str(info.value) and "\n" not in str(info.value)


def test_options_and_toml(tmp_path):
    cfg = apply_options(JobConfig(), {"data_servers": 2, "prefetch": 8}).validate()
    assert (cfg.cluster.data_servers, cfg.data.prefetch) == (2, 8)
    path = tmp_path / "job.toml"
    path.write_text("[augment]\nshift = 3\nnoise = 0.05\n")
    assert load_config(path).augment == AugmentConfig(shift=3, noise=0.05)


def test_feed_is_the_batch_stream_at_any_step_then_augmented():
    x, y = torch.randn(103, *SIGNAL), torch.arange(103)
    cfg = JobConfig.from_dict({"cluster": {"replicas": 3}, "data": {"batch_size": 8},
                               "train": {"seed": 4}})
    stream = BatchStream(x, y, replica_indices(103, 1, 3, 4), 8, seed=4 * 1000 + 1)
    feed = ReplicaFeed(x, y, cfg, replica=1)
    expected = [stream.next() for _ in range(10)]  # four batches per epoch: crosses epochs
    for step in [0, 1, 2, 7, 8, 3, 9]:
        xb, yb = feed.batch(step)
        assert torch.equal(xb, expected[step][0]) and torch.equal(yb, expected[step][1])
    cfg.augment = AugmentConfig(noise=0.1)
    noisy = ReplicaFeed(x, y, cfg, replica=1)
    xb, yb = noisy.batch(5)
    assert torch.equal(yb, expected[5][1])
    assert torch.equal(xb, Augmenter(cfg.augment, SIGNAL)(expected[5][0],
                                                          augment_generator(4, 1, 5)))


def test_distbelief_train_refuses_augmentation_that_does_not_fit_in_one_line(tmp_path):
    """Checked against the data before any process starts: exit code 2, one line."""
    (tmp_path / "job.toml").write_text("[augment]\nflip = true\n")
    result = subprocess.run([sys.executable, "-m", "distbelief.cli", "train", "job.toml",
                             "--dataset", "synthetic", "--num-samples", "100", "--model", "mlp",
                             "--data-servers", "1", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("distbelief: error: augment.flip applies to images (C, H, W)")
    assert "(32,)" in line and not (tmp_path / "runs").exists()
