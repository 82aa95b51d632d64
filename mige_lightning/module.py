"""The LightningModule: loss, optimiser, logging and the one place the heavy model is built.

Logged keys: ``train/loss``, ``train/loss_<task>``, ``train/mse``, ``train/vb`` (per step) and
``train/samples_<task>`` (samples of each task per epoch, all ranks).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from mige_lightning.checkpoint_files import (
    dtype_problem,
    named_tensors,
    nonfinite_message,
    nonfinite_problems,
)
from mige_lightning.checkpoint_state import (
    gather_rng_states,
    pack_ema,
    rank_rng_state,
    set_rng_state,
    unpack_ema,
)
from mige_lightning.condition_dropout import draw_condition_dropout
from mige_lightning.diffusion import GaussianDiffusion
from mige_lightning.evaluation import BenchmarkEvaluator, BenchmarkResult, BenchmarkRun
from mige_lightning.generate import Generated, SamplingBatch, generate
from mige_lightning.metrics import DEFAULT_CLIP_MODEL
from mige_lightning.models import MIGE, build_mige, get_config
from mige_lightning.models.autoencoder import PixelAutoencoder
from mige_lightning.models.weights import load_weights, weights_file
from mige_lightning.pipeline import MIGEPipeline, check_task_defaults, make_scheduler
from mige_lightning.prompt import (
    PROMPT_STYLES,
    PROMPT_VERSION,
    Task,
    UnseenText,
    UnseenTextTally,
    build_prompt,
    words_cut,
)
from mige_lightning.protocol import Protocol, resolve_protocol
from mige_lightning.sharding import build_sharded_mige, enable_activation_checkpointing, shard_mige

log = logging.getLogger(__name__)
LR_SCHEDULES = ("constant", "cosine")

# The frozen ViT and VAE are in eval mode on purpose (paper §3.3); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class MIGELightningModule(L.LightningModule):
    """Args:
    preset: ``tiny`` / ``mid`` / ``xl`` (``models/presets.py``).
    overrides: per-component constructor kwargs merged into the preset, e.g. ``{dit: {num_layers: 4}}``.
        A later config file's ``overrides`` is merged into the earlier one key by key, nested dicts
        too (logged); a dict typed whole on the command line replaces it (a warning names the keys
        it drops); ``null`` first replaces without a word (``mige_cli/config_overlays.py``).
    pretrained: hub ids or local dirs per component, merged into the preset's (null = random init).
        Across config files: merged key by key, as ``overrides``.
    lr, weight_decay, eps, betas, warmup_steps: AdamW with linear warm-up (the paper's recipe).
    lr_schedule: after the warm-up, ``constant`` (the paper's) or ``cosine`` (down to 0 at the run's
        last optimiser step, ``trainer.max_steps`` / epochs).
    num_train_timesteps, beta_schedule: the DDPM noise schedule (PixArt: 1000, linear).
    prediction_type: what the DiT's mean channels predict — ``epsilon`` (the paper), ``v_prediction``
        or ``sample`` (x₀); the sampler is configured to match.
    snr_gamma: min-SNR-γ loss weighting (e.g. 5.0); null = unweighted MSE (the paper).
    timestep_sampling: how training timesteps are drawn: null / ``{scheme: uniform}`` (the paper),
        ``{scheme: logit_normal, logit_mean: 1.0, logit_std: 1.0}`` (t = T·sigmoid(N(mean, std)):
        a positive mean spends more steps at high noise) or ``{scheme: mode, mode_scale: 1.29}``.
        A later config file's spec is merged into the earlier one while it names the same (or no)
        scheme; one naming another scheme replaces it whole (logged).
    p_drop_condition, p_drop_input, p_drop_both: condition dropout for guidance.
    gradient_checkpointing: recompute DiT / T5 / Q-Former block activations in the backward pass.
    fsdp_mixed_precision: under ``ModelParallelStrategy`` (FSDP2, ``configs/trainer/fsdp.yaml``):
        bf16 parameters and compute, fp32 gradient reduction and master weights.
    sampler: ``dpm++`` (DPM-Solver++ 2M), ``dpm++sde`` (its stochastic form), ``ddim`` or ``euler`` for
        ``predict`` / validation sampling.
    task_defaults: per-task sampling defaults replacing the paper's, e.g. ``{edit: {num_inference_steps:
        20, guidance_scale: 2.0, image_guidance_scale: 1.2}}`` (a request's own values still win).
        Across config files: merged per task and key, as ``overrides``.
    sample_with_ema: sample with the EMA weights when the checkpoint holds them (``callbacks.EMA``).
    predict_seed: base seed of validate, test and predict: a request without its own seed uses base +
        its position among its source's requests of its task (``mige_lightning/generate.py``), so a
        held-out request gets the same noise, and image, through each of them.
    eval_metrics: metric backbones for ``test`` / validation sampling: ``{dino: facebook/dino-vits16,
        clip_model: ViT-B-32-quickgelu, clip_pretrained: openai, crop_fn: mask}`` (hub ids or local paths); a
        backbone left out disables its metrics (logged), L1 / L2 always run. Across config files:
        merged key by key, as ``overrides`` (an overlay disables a backbone by setting it to null).
        ``test``'s scoring: ``crop_fn`` (the subject crop: ``mask``, ``mask_black`` or
        ``package.module:function``) and ``jpeg_quality`` (score each output after a JPEG round trip
        at this quality; 0 / false: as generated); null or left out, the protocol's.
    eval_num_inference_steps: override the per-task default number of sampling steps in validation
        and ``test``.
    sample_batch_invariant: compute each sample on its own (default), so an image is bitwise the
        same whatever it is batched with; ``false`` batches each group of requests into every
        forward (faster on a GPU; an image then depends on its batch-mates).
    prompt_style: ``training`` (default: the text every model here is trained on) or
        ``authors_inference`` (the strings the authors' inference scripts use; for a checkpoint
        converted with ``convert-authors``).
    init_weights: start from these weights (``model.safetensors`` or its folder, e.g. written by
        ``convert-authors`` or ``export``) instead of the pretrained sources; the autoencoder may be
        absent from the file (it comes from ``pretrained.vae``). A ``--ckpt_path`` still wins.
    meta_init: under FSDP2 (``ModelParallelStrategy``), build on the meta device and give each
        rank only its shards — drawn per module from the run's seed, pretrained tensors read row
        by row from their safetensors files — so no rank holds the whole model. ``false``: every
        rank builds the whole model first (the constructors' draws), then shards it.
    compile_dit: ``torch.compile`` each DiT transformer block (``nn.Module.compile``, in place:
        names and checkpoints are unchanged) once the model is built; the first steps pay for the
        compilation (docs/BENCHMARKS.md has the measured trade-off).
    max_nonfinite_steps: a step whose loss or gradients are not finite (on any rank) is skipped on
        every rank — no optimiser update, so weights and EMA stay finite — and counted
        (``train/skipped_nonfinite``); this many in a row stop the run with an error.
    protocol: how benchmarks are sampled and scored (``mige_lightning/protocol.py``): ``project``
        (default) or ``authors`` — what the authors' release does for the paper's tables (DreamBench
        references on black, JPEG-75 outputs, black-background subject crops, bf16 timesteps,
        posterior samples, their resize, their DPM-Solver grid, ``ln_vision`` eps 1e-5). Each part
        is also its own option (below, ``eval_metrics.jpeg_quality`` / ``crop_fn``,
        ``overrides.vision_norm_eps``, ``data.benchmark.reference_prep``); one set explicitly wins.
    sampler_time_grid: ``diffusers`` or ``authors`` (``dpm++`` only; null: the protocol's, which
        falls back to ``diffusers`` for another sampler).
    timestep_dtype: ``float32`` or ``bfloat16`` — the timesteps the DiT embeds (null: the protocol's).
    condition_latents: ``mode`` or ``sample`` — the autoencoder latents of references and source
        in sampling (``sample``: drawn from the request's seed; null: the protocol's).
    image_resize: ``project`` or ``authors`` — the sampler's resize on the autoencoder path (null:
        the protocol's; ``mige_lightning/transforms.py``).
    """

    # how to sample and score, not what was trained: given on the command line, they win over a
    # checkpoint's saved values (mige_cli/cli.py), and test / predict record them
    RUNTIME_OPTIONS = (
        "sampler",
        "predict_seed",
        "task_defaults",
        "sample_with_ema",
        "eval_metrics",
        "eval_num_inference_steps",
        "prompt_style",
        "sample_batch_invariant",
        "protocol",
        "sampler_time_grid",
        "timestep_dtype",
        "condition_latents",
        "image_resize",
    )

    def __init__(
        self,
        preset: str = "tiny",
        *,
        overrides: dict[str, Any] | None = None,
        pretrained: dict[str, str | None] | None = None,
        lr: float = 1e-5,
        weight_decay: float = 3e-2,
        eps: float = 1e-10,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        lr_schedule: str = "constant",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        snr_gamma: float | None = None,
        timestep_sampling: dict[str, Any] | None = None,
        p_drop_condition: float = 0.05,
        p_drop_input: float = 0.05,
        p_drop_both: float = 0.05,
        gradient_checkpointing: bool = False,
        fsdp_mixed_precision: bool = False,
        sampler: str = "dpm++",
        task_defaults: dict[str, dict] | None = None,
        sample_with_ema: bool = True,
        predict_seed: int = 0,
        eval_metrics: dict[str, Any] | None = None,
        eval_num_inference_steps: int | None = None,
        max_nonfinite_steps: int = 3,
        prompt_style: str = "training",
        init_weights: str | None = None,
        meta_init: bool = True,
        compile_dit: bool = False,
        sample_batch_invariant: bool = True,
        protocol: str = "project",
        sampler_time_grid: str | None = None,
        timestep_dtype: str | None = None,
        condition_latents: str | None = None,
        image_resize: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # validated here, at start-up: unknown preset / key, missing local path, protocol → clear error
        eps = self._resolve_protocol(overrides).vision_norm_eps
        protocol_overrides = {"vision_norm_eps": eps} if eps is not None else {}
        self.config = get_config(preset, {**protocol_overrides, **(overrides or {})}, pretrained)
        check_task_defaults(task_defaults)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule: {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"model.prompt_style: {prompt_style!r}; choose one of {PROMPT_STYLES}")
        if init_weights is not None:
            weights_file(init_weights)  # exists and is safetensors: fail at start-up, not after the build
        self.diffusion = GaussianDiffusion(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            snr_gamma=snr_gamma,
            timestep_sampling=timestep_sampling,
        )
        self.model: MIGE | None = None
        self._ema_weights: dict[str, torch.Tensor] | None = None
        self._resume_rng: dict | None = None  # this rank's RNG states, set at the first step after a resume
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self._nonfinite_run = 0  # consecutive steps skipped for a non-finite loss or gradient
        self._skip_reason: str | None = None  # this step's loss was not finite (on some rank)
        self._unseen_text = UnseenTextTally()  # training instructions the encoder does not see whole
        self._val_pipe: MIGEPipeline | None = None  # validation / predict sampling pipelines
        self._pipe: MIGEPipeline | None = None
        self._sampling_with_ema = False  # whether predict / test sample with the checkpoint's EMA
        self.benchmark_run: BenchmarkRun | None = None  # test: generates and scores the benchmark
        self.benchmark_result: BenchmarkResult | None = None  # test: the last run's figures

    def _resolve_protocol(self, overrides: dict | None) -> Protocol:
        hp, metrics = self.hparams, dict(self.hparams.eval_metrics or {})
        return resolve_protocol(
            hp.protocol,
            time_grid=hp.sampler_time_grid,
            timestep_dtype=hp.timestep_dtype,
            condition_latents=hp.condition_latents,
            image_resize=hp.image_resize,
            jpeg_quality=metrics.get("jpeg_quality"),
            subject_crop=metrics.get("crop_fn"),
            vision_norm_eps=(overrides or {}).get("vision_norm_eps"),
        )

    @property
    def protocol(self) -> Protocol:
        """How this module samples and scores benchmarks (``model.protocol`` and its parts), with
        the ViT norm's eps the model was built with."""
        return replace(
            self._resolve_protocol(self.hparams.overrides), vision_norm_eps=self.config.vision_norm_eps
        )

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build the networks (pretrained loads happen here, on the target device / under sharding)."""
        if self.model is None:
            self.model = self._build()
            if self.hparams.compile_dit:
                for block in self.model.dit.transformer_blocks:
                    block.compile()
        # runs after the data module's setup and before its dataloaders are built
        self.connect_datamodule()

    def _build(self) -> MIGE:
        if self.device_mesh is not None and self.hparams.meta_init:
            # ModelParallelStrategy (FSDP2): built on the meta device and materialised one unit at a
            # time, so no rank ever holds the whole model (mige_lightning/sharding.py)
            return build_sharded_mige(
                self.config,
                self.device_mesh,
                seed=self.trainer.strategy.broadcast(torch.initial_seed()),  # one draw on every rank
                init_weights=self.hparams.init_weights,
                mixed_precision=self.hparams.fsdp_mixed_precision,
                activation_checkpointing=self.hparams.gradient_checkpointing,
            )
        model = build_mige(self.config)
        if self.hparams.init_weights:  # every rank loads the full tensors
            load_weights(model, self.hparams.init_weights)
        if self.hparams.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if self.device_mesh is not None:  # ModelParallelStrategy, meta_init: false
            shard_mige(model, self.device_mesh, mixed_precision=self.hparams.fsdp_mixed_precision)
        return model

    def connect_datamodule(self, datamodule=None) -> None:
        """Hand the data module the model's image sizes, reference limit and VAE identity."""
        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "connect"):
            return
        if hasattr(datamodule, "use_protocol"):  # benchmarks: the protocol's reference preparation
            datamodule.use_protocol(self.protocol)
        datamodule.connect(
            resolution=self.config.resolution,
            vision_resolution=self.config.vision_resolution,
            vision_mean=self.config.vision_mean,
            vision_std=self.config.vision_std,
            max_images=self.config.max_images,
            check_instructions=self.instruction_problems,
            # hashing the VAE's weights costs ~1 s at paper size: only a latent cache (or shards
            # with latents) needs it
            vae_identity=self.model.autoencoder.identity()
            if getattr(datamodule, "latent_cache", None) or getattr(datamodule, "streams_latents", False)
            else None,
        )

    def instruction_problems(
        self, tasks: list[str], instructions: list[str], counts: list[int], *, style: str | None = None
    ) -> list[UnseenText]:
        """Per instruction, what of it the model would not see: words past the prompt's word limit,
        tokens past the encoder's ``max_length``, words the tokenizer does not know. ``style``:
        the prompt style (default: the one ``predict`` uses)."""
        style = style or self.hparams.prompt_style
        prompts = [build_prompt(t, i, style=style) for t, i in zip(tasks, instructions, strict=True)]
        losses = self.model.encoder.text_losses(prompts, counts)
        return [
            UnseenText(
                cut=tuple(m for m in (words_cut(text), loss.cut_message()) if m),
                unknown=tuple(m for m in (loss.unknown_message(),) if m),
            )
            for text, loss in zip(instructions, losses, strict=True)
        ]

    # ----------------------------------------------------------------------------------- training
    def encode_batch(self, batch: dict, *, drop_condition=None, drop_input=None):
        """Batch → (x_0 latents, conditional input, cond, cond_mask).

        Latents come from the batch when the data module read them from the latent cache
        (``*_latent`` keys), otherwise the frozen autoencoder encodes the pixels here.
        A dropped input becomes zeros; a dropped condition becomes the null embedding.
        """
        model = self.model
        ae = model.autoencoder
        x_start = batch["target_latent"] if "target_latent" in batch else ae.encode(batch["target"])
        has_source = batch["has_source"].clone()
        if drop_input is not None:
            has_source &= ~drop_input
        cond_input = torch.zeros_like(x_start)
        if has_source.any():
            if "source_latent" in batch:
                cond_input[has_source] = batch["source_latent"][has_source].to(cond_input.dtype)
            else:
                cond_input[has_source] = ae.encode(batch["source"][has_source]).to(cond_input.dtype)
        mask = batch["ref_mask"]
        if "ref_latent" in batch:
            ref_latents = batch["ref_latent"][mask]
        else:
            ref_latents = model.encode_references(batch["ref_vae"], mask)
        prompts = [build_prompt(t, i) for t, i in zip(batch["task"], batch["instruction"], strict=True)]
        cond, cond_mask = model.encode_condition(
            prompts,
            ref_pixels=batch["ref_pixels"],
            ref_latents=ref_latents,
            ref_mask=mask,
            drop=drop_condition,
        )
        return x_start, cond_input, cond, cond_mask

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        batch_size = len(batch["task"])
        drop_condition, drop_input = draw_condition_dropout(
            batch_size,
            p_condition=hp.p_drop_condition,
            p_input=hp.p_drop_input,
            p_both=hp.p_drop_both,
            device=self.device,
        )
        x_start, cond_input, cond, cond_mask = self.encode_batch(
            batch, drop_condition=drop_condition, drop_input=drop_input
        )
        counts = batch["ref_mask"].sum(1).tolist()
        unseen = self.instruction_problems(batch["task"], batch["instruction"], counts, style="training")
        self._unseen_text.add(batch["instruction"], unseen)
        for name, value in self._unseen_text.step_counts(unseen).items():  # summed over steps and ranks
            self.log(name, value, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True, batch_size=1)
        t = self.diffusion.sample_timesteps(batch_size, device=self.device)
        noise = torch.randn_like(x_start)
        x_t = self.diffusion.add_noise(x_start, noise, t)
        output = self.model(x_t, t, cond=cond, cond_mask=cond_mask, cond_input=cond_input)
        losses = self.diffusion.training_losses(output, x_start=x_start, x_t=x_t, t=t, noise=noise)
        loss = losses["loss"].mean()
        # a non-finite loss on any rank: every rank skips the step together (one rank alone would
        # hang the others in the next collective); no backward, no optimiser update
        nonfinite = not torch.isfinite(loss).item()
        if self._trainer is not None:  # also usable without a Trainer (benchmarks, tests)
            nonfinite = self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if nonfinite:
            per_task = {
                task: losses["loss"][[i for i, n in enumerate(batch["task"]) if n == task]].tolist()
                for task in sorted(set(batch["task"]))
            }
            self._skip_reason = f"loss (this rank: {loss.item()}; per-sample losses by task: {per_task})"
            # Lightning refuses a None step when distributed: backward a finite stand-in through
            # the same graph (its gradients are dropped in on_before_optimizer_step)
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0

        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/mse", losses["mse"].mean(), batch_size=batch_size)
        self.log("train/vb", losses["vb"].mean(), batch_size=batch_size)
        tasks = batch["task"]
        for task in Task:
            idx = [i for i, name in enumerate(tasks) if name == task.value]
            if idx:
                self.log(f"train/loss_{task.value}", losses["loss"][idx].mean(), batch_size=len(idx))
            # samples of each task seen this epoch, summed over steps and ranks
            self.log(
                f"train/samples_{task.value}",
                float(len(idx)),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=1,
            )
        return loss

    def on_train_epoch_end(self) -> None:
        if (summary := self._unseen_text.summary(self.current_epoch)) is not None:
            log.warning(summary)  # this rank's share; the logged counts are summed over ranks
        self._unseen_text = UnseenTextTally()

    def _skip_nonfinite(self, what: str) -> None:
        self._nonfinite_run += 1
        limit = self.hparams.max_nonfinite_steps
        message = (
            f"step {self.global_step}: non-finite {what}; step skipped, weights unchanged "
            f"({self._nonfinite_run} in a row, the limit is {limit})"
        )
        if self._nonfinite_run >= limit:
            raise FloatingPointError(
                f"{message}. Stopping: a diverging run usually needs a lower model.lr or a gradient "
                "clip (trainer.gradient_clip_val)"
            )
        log.warning(message)
        self.log("train/skipped_nonfinite", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Non-finite gradients on any rank: drop every gradient on every rank, so AdamW leaves the
        parameters (and their moments) untouched this step."""
        grads = [
            p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            for p in self.trainable_parameters()
            if p.grad is not None
        ]
        # a NaN / inf anywhere makes its norm non-finite: one fused reduction, one host sync
        bad = bool(grads) and not torch.stack(torch._foreach_norm(grads)).isfinite().all().item()
        reason, self._skip_reason = self._skip_reason, None  # set by training_step (same on all ranks)
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False) or reason is not None:
            for p in self.trainable_parameters():
                p.grad = None
            self._skip_nonfinite(reason or "gradients")
        else:
            self._nonfinite_run = 0

    def on_train_start(self) -> None:
        # Lightning seeds every rank alike: offset the global generator by rank so ranks draw
        # different timesteps, noise and dropout for their different samples (a resume then
        # restores each rank's own saved state in on_train_batch_start)
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, after the data loader was rebuilt (which draws from the global generator)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    # ---------------------------------------------------------------------------------- optimiser
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            eps=hp.eps,
            betas=tuple(hp.betas),
        )
        if hp.lr_schedule == "cosine":
            total = self.trainer.estimated_stepping_batches  # optimiser steps of the whole run
            scheduler = get_cosine_schedule_with_warmup(optimizer, hp.warmup_steps, total)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mige"] = {"prompt_version": PROMPT_VERSION, "config": self.config.to_dict()}
        checkpoint["rng_states"] = gather_rng_states()  # every rank's, for an exact resume
        pack_ema(checkpoint)  # sharded EMA weights → shards of a distributed checkpoint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:
            params = dict(self.named_parameters())
            unpack_ema(checkpoint, path=self.trainer.ckpt_path, params=params)
            if self.trainer.state.fn == "fit":
                states = checkpoint.get("rng_states")
                world = self.trainer.world_size
                self._resume_rng = rank_rng_state(states, rank=self.global_rank, world_size=world)
        self._refuse_unloadable_weights(checkpoint)
        self._ema_weights = checkpoint.get("ema")
        saved = checkpoint.get("mige", {}).get("prompt_version", PROMPT_VERSION)
        if saved != PROMPT_VERSION:
            raise ValueError(
                f"checkpoint was trained with prompt version {saved}, this code builds version {PROMPT_VERSION}"
            )

    def _refuse_unloadable_weights(self, checkpoint: dict) -> None:
        """NaN / inf in the checkpoint's weights, EMA weights or (``fit``) optimiser state, or an
        integer tensor for a float one: refused naming the file and the tensors, before anything is
        loaded — on every rank together (under ``ModelParallelStrategy`` the strategy has already
        read the weights into this rank's shards: those are checked)."""
        trainer = self._trainer
        where = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "checkpoint"
        weights = checkpoint.get("state_dict")
        own = self.state_dict()
        if weights is None:
            weights = own
        kinds = [p for k, v in weights.items() if k in own and (p := dtype_problem(k, v.dtype, own[k].dtype))]
        bad = nonfinite_problems(weights) + nonfinite_problems(checkpoint.get("ema") or {}, prefix="ema.")
        if trainer is not None and trainer.state.fn == "fit":
            optimizer = dict(named_tensors(checkpoint.get("optimizer_states", []), "optimizer_states"))
            bad += nonfinite_problems(optimizer)
        refuse = bool(bad or kinds)
        if trainer is not None and trainer.world_size > 1:  # a shard of another rank may be the bad one
            refuse = trainer.strategy.reduce_boolean_decision(refuse, all=False)
        if kinds:
            raise ValueError(f"{where}: {len(kinds)} tensor(s) of another kind: " + ", ".join(kinds[:5]))
        if bad:
            raise ValueError(nonfinite_message(where, bad))
        if refuse:
            raise ValueError(f"{where}: non-finite values in another rank's shards (named in its error)")

    # ----------------------------------------------------------------------------------- sampling
    def pipeline(self, scheduler: str | None = None) -> MIGEPipeline:
        """The inference pipeline over this module's networks (no copies), sampling as the protocol
        says (an explicit ``sampler_time_grid`` for another sampler than ``dpm++`` is an error)."""
        name, protocol = scheduler or self.hparams.sampler, self.protocol
        time_grid = protocol.time_grid if name == "dpm++" or self.hparams.sampler_time_grid else "diffusers"
        return MIGEPipeline.from_mige(
            self.model,
            resolution=self.config.resolution,
            vision_mean=self.config.vision_mean,
            vision_std=self.config.vision_std,
            scheduler=make_scheduler(
                name,
                num_train_timesteps=self.hparams.num_train_timesteps,
                beta_schedule=self.hparams.beta_schedule,
                prediction_type=self.hparams.prediction_type,
                clip_sample=isinstance(
                    self.model.autoencoder, PixelAutoencoder
                ),  # pixel-space data is in [-1, 1]
                time_grid=time_grid,
            ),
            task_defaults=self.hparams.task_defaults,
            prompt_style=self.hparams.prompt_style,
            timestep_dtype=protocol.timestep_dtype,
            condition_latents=protocol.condition_latents,
            image_resize=protocol.image_resize,
        )

    def use_ema_weights(self) -> bool:
        """Copy the checkpoint's EMA weights into the model; False when there are none."""
        if not self._ema_weights:
            return False
        params = dict(self.named_parameters())
        missing = [n for n in self._ema_weights if n not in params]
        if missing:
            raise ValueError(f"checkpoint EMA has weights the model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, value in self._ema_weights.items():
                params[name].copy_(value)
        return True

    # --------------------------------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate" and self.hparams.sample_with_ema and self.use_ema_weights():
            log.info("validating with the checkpoint's EMA weights")  # in fit, the EMA callback swaps
        self._val_pipe = self.pipeline()
        self._val_pipe.set_progress_bar_config(disable=True)

    def generate(self, pipe: MIGEPipeline, requests: list, *, eval_steps: bool = False) -> SamplingBatch:
        """The one sampling path of validate, test and predict (``mige_lightning/generate.py``):
        seeds ``predict_seed + number`` unless a request has its own, ``sample_batch_invariant``."""
        return generate(
            pipe,
            requests,
            base_seed=self.hparams.predict_seed,
            num_inference_steps=self.hparams.eval_num_inference_steps if eval_steps else None,
            batch_invariant=self.hparams.sample_batch_invariant,
        )

    def validation_step(self, batch: SamplingBatch, batch_idx: int) -> SamplingBatch:
        """One held-out batch (``HeldOutRow``s of one task, ``datamodules/heldout.py``) → one
        ``Generated`` per row, sampled with the task defaults (``model.eval_num_inference_steps``
        overrides the step count); scored by ``callbacks.validation_metrics.ValidationMetrics``."""
        return self.generate(self._val_pipe, [row.request for row in batch], eval_steps=True)

    def sampling_pipeline(self) -> MIGEPipeline:
        """``predict`` / ``test``: the checkpoint's EMA weights swapped in (``sample_with_ema``), and
        the pipeline over them."""
        self._sampling_with_ema = bool(self.hparams.sample_with_ema and self.use_ema_weights())
        if self._sampling_with_ema:
            log.info("sampling with the checkpoint's EMA weights")
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def on_predict_start(self) -> None:
        self._pipe = self.sampling_pipeline()

    def predict_step(self, batch: SamplingBatch, batch_idx: int) -> SamplingBatch:
        """Requests (``datamodules/requests.py``) → one ``Generated`` per request, in order; its
        settings record whether the EMA weights were used."""
        out = self.generate(self._pipe, [item.request for item in batch])
        return SamplingBatch(
            Generated(g.request, g.image, {**g.settings, "ema": self._sampling_with_ema}) for g in out
        )

    # ---------------------------------------------------------------------------------- benchmarks
    def build_evaluator(self, judge=None) -> BenchmarkEvaluator:
        """The benchmark scorer; ``judge``: the data's own judge of outputs, where it has one."""
        cfg = dict(self.hparams.eval_metrics or {})
        unknown = set(cfg) - {"dino", "clip_model", "clip_pretrained", "crop_fn", "jpeg_quality"}
        if unknown:
            raise KeyError(f"model.eval_metrics: unknown keys {sorted(unknown)}")
        protocol = self.protocol  # crop_fn / jpeg_quality: null takes the protocol's
        return BenchmarkEvaluator(
            dino=cfg.get("dino"),
            clip_model=cfg.get("clip_model") or DEFAULT_CLIP_MODEL,
            clip_pretrained=cfg.get("clip_pretrained"),
            crop_fn=protocol.subject_crop,
            jpeg_quality=protocol.jpeg_quality,
            judge=judge,
        )

    def on_test_start(self) -> None:
        self.benchmark_result = None
        pipe = self.sampling_pipeline()
        # the data module's judge of outputs (the synthetic world's pixel judge), where it has one
        make_judge = getattr(self.trainer.datamodule, "output_judge", None)
        judge = make_judge() if callable(make_judge) else None
        evaluator = self.build_evaluator(judge).to(self.device)  # held by the run: no checkpoint state
        self.benchmark_run = BenchmarkRun(
            lambda requests: self.generate(pipe, requests, eval_steps=True), evaluator
        )

    def test_step(self, batch: SamplingBatch, batch_idx: int) -> dict:
        """Benchmark items → ``{"generated", "rows", "ema"}`` (``BenchmarkRun.step``), handed to
        the callbacks' ``on_test_batch_end`` (``callbacks.benchmark_report.BenchmarkReport``)."""
        return {**self.benchmark_run.step(batch), "ema": self._sampling_with_ema}

    def on_test_epoch_end(self) -> None:
        # synced across ranks by torchmetrics: the same values on every rank; the report callback
        # reads the typed result, the logged keys are a view of it
        self.benchmark_result = self.benchmark_run.compute()
        for name, value in self.benchmark_result.log_values().items():
            self.log(name, value)

    def on_test_end(self) -> None:
        self.benchmark_run = None
