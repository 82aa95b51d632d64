"""The DDPM hybrid objective against the scheduler's tables and against closed-form cases."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from mige_lightning.condition_dropout import draw_condition_dropout
from mige_lightning.diffusion import GaussianDiffusion, normal_kl


def test_tables_and_noising_match_diffusers_scheduler():
    diff = GaussianDiffusion()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    assert torch.allclose(diff.log_betas.exp(), sched.betas, rtol=1e-5)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(diff.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6)


def test_perfect_prediction_has_zero_loss_for_t_above_zero():
    diff = GaussianDiffusion()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 400, 999])
    x_t = diff.add_noise(x0, noise, t)
    # ε exact and v = -1 → model variance = the true posterior variance → KL = 0
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = diff.training_losses(output, x_start=x0, x_t=x_t, t=t, noise=noise)
    assert torch.allclose(losses["mse"], torch.zeros(3), atol=1e-8)
    assert torch.allclose(losses["vb"], torch.zeros(3), atol=1e-4)


def test_vb_matches_a_direct_kl_and_trains_only_the_variance_channels():
    diff = GaussianDiffusion()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([250, 750])
    x_t = diff.add_noise(x0, noise, t)
    output = torch.randn(2, 8, 8, 8, requires_grad=True)
    losses = diff.training_losses(output, x_start=x0, x_t=x_t, t=t, noise=noise)
    # direct computation in float64 from the scheduler's ᾱ
    ab = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    eps, v = output.detach().double().split(4, dim=1)
    for i, ti in enumerate(t.tolist()):
        a, a_prev, beta = ab[ti], ab[ti - 1], 1 - ab[ti] / ab[ti - 1]
        post_var = beta * (1 - a_prev) / (1 - a)
        x0_hat = (x_t[i].double() - (1 - a).sqrt() * eps[i]) / a.sqrt()
        c1, c2 = beta * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - beta).sqrt() / (1 - a)
        frac = ((v[i] + 1) / 2).clamp(0, 1)
        model_logvar = frac * beta.log() + (1 - frac) * post_var.log()
        kl = normal_kl(
            c1 * x0.double()[i] + c2 * x_t[i].double(),
            post_var.log(),
            c1 * x0_hat + c2 * x_t[i].double(),
            model_logvar,
        )
        expected = kl.mean() / torch.log(torch.tensor(2.0, dtype=torch.float64))
        assert torch.allclose(losses["vb"][i].double(), expected, rtol=1e-3), (ti, losses["vb"][i], expected)
    losses["vb"].sum().backward()
    assert output.grad[:, :4].abs().sum() == 0  # ε is stop-gradient inside the VLB
    assert output.grad[:, 4:].abs().sum() > 0


def test_variance_values_beyond_the_interpolation_range_act_as_its_ends():
    """The log-variance interpolates between the posterior variance (v = -1) and β_t (v = 1); a value
    past either end scores as that end and gets no gradient, so the VLB cannot push the shared
    trunk towards ever larger variances (with the x₀ target that wrecked the mean near t = 0)."""
    diff = GaussianDiffusion(prediction_type="sample")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 5, 600])
    x_t = diff.add_noise(x0, noise, t)
    mean = x0 + 0.3 * torch.randn_like(x0)  # a poor x₀ estimate: the VLB wants the largest variance
    far = torch.cat([mean, torch.full_like(x0, 3.0)], 1).requires_grad_(True)
    end = torch.cat([mean, torch.ones_like(x0)], 1)
    lf = diff.training_losses(far, x_start=x0, x_t=x_t, t=t, noise=noise)
    le = diff.training_losses(end, x_start=x0, x_t=x_t, t=t, noise=noise)
    assert torch.allclose(lf["vb"], le["vb"])
    lf["vb"].sum().backward()
    assert far.grad[:, 4:].abs().sum() == 0
    inside = torch.cat([mean, torch.full_like(x0, 0.5)], 1).requires_grad_(True)
    diff.training_losses(inside, x_start=x0, x_t=x_t, t=t, noise=noise)["vb"].sum().backward()
    assert inside.grad[:, 4:].abs().sum() > 0


def test_t_zero_uses_the_decoder_nll():
    diff = GaussianDiffusion()
    x0, noise = torch.rand(1, 4, 8, 8) * 2 - 1, torch.randn(1, 4, 8, 8)
    t = torch.tensor([0])
    out = torch.cat([noise, torch.zeros_like(noise)], 1)
    losses = diff.training_losses(out, x_start=x0, x_t=diff.add_noise(x0, noise, t), t=t, noise=noise)
    assert losses["vb"].item() > 0  # a log-likelihood in bits, not a KL between equal posteriors


def test_condition_dropout_rates_and_exclusive_outcomes():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    drop_c, drop_i = draw_condition_dropout(n, p_condition=0.05, p_input=0.05, p_both=0.05, generator=gen)
    only_c = (drop_c & ~drop_i).float().mean()
    only_i = (~drop_c & drop_i).float().mean()
    both = (drop_c & drop_i).float().mean()
    tol = 4 * (0.05 * 0.95 / n) ** 0.5  # 4 binomial standard deviations
    for rate in (only_c, only_i, both):
        assert abs(rate - 0.05) < tol
    assert abs((~drop_c & ~drop_i).float().mean() - 0.85) < 4 * (0.85 * 0.15 / n) ** 0.5


# ------------------------------------------------------------------ prediction targets and weighting
import pytest  # noqa: E402

from mige_lightning.diffusion import PREDICTION_TYPES  # noqa: E402


def _as_prediction(diff: GaussianDiffusion, x0_hat, x_t, t):
    """The output each target type gives when the model's estimate of x₀ is ``x0_hat``."""
    a = diff._at(diff.sqrt_alphas_cumprod, t, x_t)
    s = diff._at(diff.sqrt_one_minus_alphas_cumprod, t, x_t)
    eps_hat = (x_t - a * x0_hat) / s
    return {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": a * eps_hat - s * x0_hat}


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_each_target_perfect_prediction_gives_x0_and_zero_loss(kind):
    diff = GaussianDiffusion(prediction_type=kind)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 400, 999])
    x_t = diff.add_noise(x0, noise, t)
    target = diff.target(x0, noise, t)
    assert torch.allclose(target, _as_prediction(diff, x0, x_t, t)[kind], atol=1e-3)
    assert torch.allclose(diff.predict_xstart(target, x_t, t), x0, atol=1e-3)
    out = torch.cat([target, -torch.ones_like(noise)], dim=1)
    losses = diff.training_losses(out, x_start=x0, x_t=x_t, t=t, noise=noise)
    assert torch.allclose(losses["mse"], torch.zeros(3), atol=1e-8)
    assert torch.allclose(losses["vb"], torch.zeros(3), atol=1e-3)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_targets_agree_on_the_variance_term_and_min_snr_weighs_the_same_x0_error(gamma):
    """The same x₀ estimate, expressed as ε, v or x₀: the VLB term is identical, and min-SNR-γ
    makes the weighted MSE the same function of the x₀ error for all three (min(SNR, γ)·|x̂₀ − x₀|²)."""
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([3, 100, 600, 990])
    var = torch.rand(4, 4, 8, 8) * 2 - 1
    ref = GaussianDiffusion()
    x_t = ref.add_noise(x0, noise, t)
    x0_hat = x0 + 0.3 * torch.randn_like(x0)
    losses = {}
    for kind in PREDICTION_TYPES:
        diff = GaussianDiffusion(prediction_type=kind, snr_gamma=gamma)
        pred = _as_prediction(diff, x0_hat, x_t, t)[kind]
        losses[kind] = diff.training_losses(torch.cat([pred, var], 1), x_start=x0, x_t=x_t, t=t, noise=noise)
    for kind in ("sample", "v_prediction"):
        assert torch.allclose(losses[kind]["vb"], losses["epsilon"]["vb"], rtol=1e-3, atol=1e-4)
    if gamma is not None:
        snr = ref.snr[t]
        x0_err = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
        for kind in PREDICTION_TYPES:
            weighted = losses[kind]["loss"] - losses[kind]["vb"]
            assert torch.allclose(weighted, snr.clamp(max=gamma) * x0_err, rtol=2e-3), kind
    else:  # unweighted: each target's own MSE, which weighs the x₀ error differently per timestep
        assert not torch.allclose(losses["epsilon"]["mse"], losses["sample"]["mse"], rtol=0.1)


def test_bad_prediction_settings_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(prediction_type="x0")
    with pytest.raises(ValueError, match="snr_gamma"):
        GaussianDiffusion(snr_gamma=0)


def test_timestep_sampling_density_spends_the_steps_where_it_says():
    """uniform: a fraction 0.4 of the draws at t >= 600; logit_normal(1, 1): P(sigmoid(z) >= 0.6)
    with z ~ N(1, 1), i.e. Φ(1 − logit 0.6) = 0.722; every draw a valid integer step."""
    import math

    n = 40_000
    cases = [
        (None, 0.4),
        ({"scheme": "uniform"}, 0.4),
        (
            {"scheme": "logit_normal", "logit_mean": 1.0, "logit_std": 1.0},
            0.5 * (1 + math.erf((1.0 - math.log(0.6 / 0.4)) / math.sqrt(2))),
        ),
    ]
    for spec, want in cases:
        scheme = spec and spec["scheme"]
        diffusion = GaussianDiffusion(timestep_sampling=spec)
        torch.manual_seed(0)
        t = diffusion.sample_timesteps(n, device="cpu")
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
        assert abs((t >= 600).float().mean().item() - want) < 0.01, scheme


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"scheme": "lognormal"}, "choose one of"),
        ({"scheme": "logit_normal", "logit_mean": 1.0}, r"takes \['logit_mean', 'logit_std'\]"),
        ({"scheme": "uniform", "logit_std": 1.0}, "takes no arguments"),
        ({"scheme": "logit_normal", "logit_mean": 1.0, "logit_std": 0.0}, "must be positive"),
        ({"scheme": "mode", "mode_scale": "1.29"}, "a number"),
    ],
)
def test_bad_timestep_sampling_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(timestep_sampling=spec)
