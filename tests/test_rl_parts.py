"""Unit tests of the RL building blocks: log-probs, KL, advantages, difficulty weights."""

import pytest
import torch

from pipeline.models.restorer import PixelRestorer
from pipeline.rl.advantages import group_advantages, zero_variance_share
from pipeline.rl.difficulty import DifficultyTracker, quantiles, rl_weights
from pipeline.rl.policy import gaussian_kl, gaussian_log_prob, step_mask
from tests.conftest import smoke_params


@pytest.fixture
def rollout():
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    lq = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model.sample(lq, steps=4, eta=1.0, generator=torch.Generator().manual_seed(1), keep_trajectory=True)
    return model, lq, out


def test_recomputed_log_prob_ratio_is_exactly_one_before_any_update(rollout):
    model, lq, out = rollout
    model.timesteps(4)
    for i, t in enumerate(out.timesteps):
        old = gaussian_log_prob(out.latents[i + 1], out.steps[i].mean, out.steps[i].std)
        new_step = model.step(out.latents[i], t, lq, eta=1.0)
        new = gaussian_log_prob(out.latents[i + 1], new_step.mean, new_step.std)
        assert torch.equal(torch.exp(new - old), torch.ones_like(new))


def test_log_prob_is_pixel_mean_and_finite(rollout):
    _, _, out = rollout
    lp = gaussian_log_prob(out.latents[1], out.steps[0].mean, out.steps[0].std)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    # Pixel mean, not sum: the value does not grow with the image size.
    big = gaussian_log_prob(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), 0.5)
    small = gaussian_log_prob(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 0.5)
    torch.testing.assert_close(big, small)


def test_deterministic_last_step_is_masked_and_carries_no_loss(rollout):
    model, lq, out = rollout
    stds = [s.std for s in out.steps]
    assert step_mask(stds).tolist() == [1.0, 1.0, 1.0, 0.0]
    last = out.steps[-1]
    mean = last.mean.clone().requires_grad_(True)
    lp = gaussian_log_prob(out.latents[-1], mean, last.std)
    assert torch.equal(lp, torch.zeros(3)) and not lp.requires_grad


def test_kl_to_identical_reference_is_zero_and_grows_with_distance(rollout):
    model, lq, out = rollout
    ref = model.reference()
    model.timesteps(4)
    t = out.timesteps[0]
    a, b = model.step(out.latents[0], t, lq, 1.0), ref.step(out.latents[0], t, lq, 1.0)
    assert torch.equal(gaussian_kl(a.mean, b.mean, a.std), torch.zeros(3))
    shifted = gaussian_kl(a.mean + 0.1, b.mean, a.std)
    torch.testing.assert_close(shifted, torch.full((3,), 0.01 / (2 * a.std**2)))


def test_group_advantages_are_normalised_and_clipped():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 100.0]])
    adv = group_advantages(rewards, clip=1.5)
    torch.testing.assert_close(adv[0].mean(), torch.tensor(0.0))
    torch.testing.assert_close(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4)), "a group without reward variance has no signal"
    assert adv[2].max() == 1.5 and adv[2].min() < 0
    assert zero_variance_share(rewards) == pytest.approx(1 / 3)
    # Global std: groups with a small spread get small advantages.
    g = group_advantages(torch.tensor([[0.0, 1.0], [0.0, 100.0]]), clip=100, std_scope="global")
    assert g[0].abs().max() < g[1].abs().max()


def test_difficulty_weights_are_monotone_and_within_unit_interval():
    reference = torch.linspace(0, 1, 101)
    d = torch.linspace(-0.5, 1.5, 50)
    w = rl_weights(quantiles(d, reference), q_lo=0.3, q_hi=0.7)
    assert (w >= 0).all() and (w <= 1).all()
    assert (w[1:] >= w[:-1]).all()
    assert w[0] == 0 and w[-1] == 1
    with pytest.raises(ValueError, match="q_lo"):
        rl_weights(w, 0.8, 0.2)


def test_difficulty_tracker_window_and_state_round_trip():
    tracker = DifficultyTracker(torch.zeros(10), window=8)
    tracker.update(torch.ones(4))
    assert tracker.values.tolist() == [0.0] * 4 + [1.0] * 4
    # A sample harder than everything seen gets full RL weight, an easier one none.
    assert tracker.weights(torch.tensor([2.0, -1.0]), 0.25, 0.75).tolist() == [1.0, 0.0]
    other = DifficultyTracker(torch.zeros(1))
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.values, tracker.values)


def test_collect_groups_rollouts_and_ppo_ratio_starts_at_one():
    from pipeline.rl.rollout import collect, ppo_loss, step_log_prob

    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, tasks=["a", "b"])
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    lq = torch.rand(2, 3, 16, 16) * 2 - 1
    r = collect(model, lq, lq.clone(), ["a", "b"], group_size=3, steps=4, eta=1.0,
                generator=torch.Generator().manual_seed(0))
    assert r.n_groups == 2 and r.log_probs.shape == (4, 6) and r.x0.shape == (4, 6, 3, 16, 16)
    assert r.tasks == ["a", "a", "a", "b", "b", "b"]
    assert not torch.allclose(r.images[0], r.images[1]), "group members differ by their noise"
    idx = torch.arange(6)
    for step in range(3):
        new, _ = step_log_prob(model, r, step, idx, eta=1.0)
        loss, clipped = ppo_loss(new, r.log_probs[step], torch.ones(6), clip=1e-4)
        torch.testing.assert_close(loss, -torch.ones(6))  # ratio exactly 1
        assert not clipped.any()
    with pytest.raises(ValueError, match="eta > 0"):
        collect(model, lq, lq, ["a", "b"], 2, 4, 0.0, torch.Generator())


def test_ppo_loss_clips_the_ratio_in_the_advantage_direction():
    from pipeline.rl.rollout import ppo_loss

    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))
    loss, clipped = ppo_loss(new, old, torch.tensor([1.0, -1.0]), clip=0.2)
    # Positive advantage, ratio 1.5 -> capped at 1.2; negative advantage, ratio 0.5 -> capped at 0.8.
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.8]))
    assert clipped.tolist() == [True, True]
