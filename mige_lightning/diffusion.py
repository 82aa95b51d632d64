"""DDPM training objective with learned variance (improved-DDPM hybrid loss, as PixArt trains).

The β / ᾱ tables come from diffusers' ``DDPMScheduler``; only the posterior and the two
log-likelihood terms of the VLB (which no library ships) are written here.

The mean channels predict one of diffusers' three targets (``prediction_type``): ``epsilon`` (the
paper's, PixArt's), ``v_prediction`` (v = √ᾱ ε − √(1−ᾱ) x₀) or ``sample`` (x₀). The MSE can be
weighted per timestep by min-SNR-γ (Hang et al. 2023): weight = min(SNR, γ) / SNR for ε,
min(SNR, γ) / (SNR + 1) for v and min(SNR, γ) for x₀ — the same weighting of the x₀ error for all
three. Whatever the target, the variance channels are trained by the VLB through the x₀ the mean
channels imply (detached), so the learned variance means the same thing for every target.

Training timesteps are drawn uniformly (the paper's) or from diffusers' SD3 densities
(``logit_normal``: t = T·sigmoid(N(mean, std)); ``mode``), which can spend more of the steps on
the high-noise levels where a sample's layout is decided.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from torch import nn


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """log p(x) for x in [-1, 1] discretised into 256 bins (the t = 0 decoder term), in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names
# how training timesteps are drawn: uniform, or a diffusers SD3 density with its arguments
TIMESTEP_SAMPLING = {"uniform": (), "logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",)}


def check_timestep_sampling(spec: dict | None) -> dict:
    """``{scheme: uniform}`` (the default), ``{scheme: logit_normal, logit_mean: m, logit_std: s}`` or
    ``{scheme: mode, mode_scale: c}``: every argument its scheme needs, none it does not."""
    spec = {"scheme": "uniform"} if spec is None else dict(spec)
    name = spec.get("scheme")
    if name not in TIMESTEP_SAMPLING:
        raise ValueError(
            f"model.timestep_sampling.scheme: {name!r}; choose one of {sorted(TIMESTEP_SAMPLING)}"
        )
    want = set(TIMESTEP_SAMPLING[name])
    given = set(spec) - {"scheme"}
    if given != want:
        raise ValueError(
            f"model.timestep_sampling: scheme {name!r} takes {sorted(want) or 'no arguments'}, got {sorted(given)}"
        )
    for key in want:
        if not isinstance(spec[key], int | float) or isinstance(spec[key], bool):
            raise ValueError(f"model.timestep_sampling.{key}: a number, got {spec[key]!r}")
    if name == "logit_normal" and spec["logit_std"] <= 0:
        raise ValueError(f"model.timestep_sampling.logit_std: must be positive, got {spec['logit_std']}")
    return spec


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion(nn.Module):
    """Noise-schedule tables as (non-persistent) buffers, so they follow the module's device."""

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        snr_gamma: float | None = None,
        timestep_sampling: dict | None = None,
    ):
        super().__init__()
        # the density's name and its keyword arguments, split once (sampled every training step)
        self._density_args = check_timestep_sampling(timestep_sampling)  # a fresh dict
        self._density = self._density_args.pop("scheme")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: unknown {prediction_type!r}; choose one of {list(PREDICTION_TYPES)}"
            )
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (or null for no weighting), got {snr_gamma}")
        self.prediction_type, self.snr_gamma = prediction_type, snr_gamma
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self.num_timesteps = num_train_timesteps
        betas = self.scheduler.betas.double()
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "log_betas": torch.log(betas),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
            # the posterior variance is 0 at t = 0: clip its log to the t = 1 value (as improved DDPM)
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * (1.0 - betas).sqrt()
            / (1.0 - alphas_cumprod),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch: int, *, device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training timesteps [B] in [0, T), as ``timestep_sampling`` says."""
        if self._density == "uniform":
            return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)
        # imported here: diffusers.training_utils pulls in diffusers' whole pipeline registry (2 s and
        # every pipeline module), which the uniform default and every spawned worker never need
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self._density, batch, **self._density_args, device=device, generator=generator
        )
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def add_noise(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the mean channels are trained to output, for this ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x_start
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def predict_xstart(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x₀ implied by the mean channels' output at (x_t, t)."""
        if self.prediction_type == "epsilon":
            return (
                self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * prediction
            )
        if self.prediction_type == "sample":
            return prediction
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * prediction
        )

    def mse_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE weight [B]: 1, or min-SNR-γ expressed for this target."""
        if self.snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def training_losses(
        self,
        model_output: torch.Tensor,
        *,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample ``loss = w(t)·mse + vb`` ([B] each); ``model_output`` is the prediction ⊕ the
        variance values, 2C channels.

        The VLB term sees the prediction detached (stop-gradient), so it trains only the variance
        channels and the MSE alone trains the mean, exactly as in improved DDPM's hybrid objective.
        """
        channels = x_t.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; learned sigma needs {2 * channels}"
            )
        prediction, var_values = model_output.float().split(channels, dim=1)
        x_start, x_t, noise = x_start.float(), x_t.float(), noise.float()
        mse = _mean_flat((self.target(x_start, noise, t) - prediction) ** 2)

        # model's log-variance interpolates between the posterior's clipped variance and β_t. The
        # fraction is clamped to [0, 1] (the interpolation's own range): unclamped, the VLB term
        # keeps pushing the variance channels past β_t where the mean is still poor, and with the
        # x₀ target those gradients, shared by the trunk, wrecked the mean at t ≤ 10 (samplers
        # that end at t = 0 returned noise; tests/test_memorise.py)
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(self.log_betas, t, x_t)
        frac = ((var_values + 1) / 2).clamp(0.0, 1.0)
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart(prediction.detach(), x_t, t)
        coef1 = self._at(self.posterior_mean_coef1, t, x_t)
        coef2 = self._at(self.posterior_mean_coef2, t, x_t)
        model_mean = coef1 * pred_xstart + coef2 * x_t
        true_mean = coef1 * x_start + coef2 * x_t
        true_log_variance = min_log

        kl = _mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(
            2.0
        )
        nll = -_mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=model_mean, log_scales=0.5 * model_log_variance
            )
        ) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": self.mse_weight(t) * mse + vb, "mse": mse, "vb": vb}


# ------------------------------------------------------------------------------------ guidance
def cfg_2way(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``p(∅) + guidance_scale · (p(c) − p(∅))`` (subject-driven generation), where p is the
    network's prediction — ε, v or x₀, whichever ``prediction_type`` it was trained for: the
    combination is linear, so it is the same for each."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def cfg_3way(
    pred_null_zero: torch.Tensor,
    pred_null_src: torch.Tensor,
    pred_cond_src: torch.Tensor,
    *,
    guidance_scale: float,
    image_guidance_scale: float,
) -> torch.Tensor:
    """InstructPix2Pix form (editing), with p(condition, conditional input) the prediction:
    ``p(∅, 0) + image_guidance_scale · (p(∅, src) − p(∅, 0)) + guidance_scale · (p(c, src) − p(∅, src))``
    (the paper's s_s and s_y)."""
    return (
        pred_null_zero
        + image_guidance_scale * (pred_null_src - pred_null_zero)
        + guidance_scale * (pred_cond_src - pred_null_src)
    )
