"""The LightningModule of one training stage: a RUNet generator, optionally a 3-D discriminator.

Manual optimization, because the GAN has two optimizers with different schedules: the
generator steps through Lightning (so ``global_step`` counts generator steps) and the
discriminator steps its raw AdamW. Validation runs the real :class:`fmc.pipeline.FusionPipeline`
on whole validation volumes and logs the mean N_SSIM that picks the best checkpoint.

Checkpoints hold only tensors and plain dicts (``hparams``: config dict, stage, network
configs), so ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from fmc.difference_weighting import difference_weighting
from fmc.metrics import n_ssim
from fmc.network import Discriminator3D, RUNet, RUNetConfig, preset
from fmc.normalization import CARD_NORMALIZATION
from fmc.pipeline import FusionPipeline, PipelineConfig
from fmc.step1_mode import Step1ModeRule
from fmc.training.cache import CachedCase
from fmc.training.config import FitConfig, MethodConfig
from fmc.training.losses import (
    LossWeights,
    discriminator_loss,
    generator_adversarial_loss,
    reconstruction_loss,
)
from fmc.training.pipeline_config import pipeline_config_of
from fmc.training.preview import mip_panel, save_png
from fmc.weights import LoadedModel, ModelCard, ModelSet

log = logging.getLogger(__name__)


def network_config(method: MethodConfig, stage: int) -> RUNetConfig:
    """Stage 2 sees [input, step-1 output] when the model has a step 1, else the input alone.

    With a step 1, stage 2's global residual is the step-1 output (channel 1, ``--step2-residual
    step1``) or the input (channel 0, ``input``); either way its head starts at zero, so it starts
    from that prediction. In "correction" mode step 1 starts as the identity too, so the untrained
    pipeline is the resampled input.
    """
    if stage == 2 and method.step1_enabled:
        inputs = len(method.step2_inputs())
        if method.step2_residual == "input":
            return replace(preset(method.preset, in_channels=inputs), residual_channel=0, zero_head=True)
        return replace(preset(method.preset, in_channels=inputs), residual_channel=1)
    inputs = len(method.step2_inputs()) if stage == 2 else 1
    zero_head = Step1ModeRule(method.step1_mode).zero_head
    return replace(preset(method.preset, in_channels=inputs), zero_head=zero_head)


def apply_difference_weighting(inp: torch.Tensor, out: torch.Tensor, max_filter: int = 0) -> torch.Tensor:
    """Eq. (2) per sample of a ``(B,1,Z,Y,X)`` batch (the pipeline normalizes |I - O'| per volume)."""
    return torch.stack([difference_weighting(i, o, max_filter) for i, o in zip(inp, out, strict=True)])


class FusionModule(L.LightningModule):
    """One stage (1: global volumes, 2: patches) of the two-step method, or both jointly.

    Joint training (``--step joint``) is stage 2 with a trainable step-1 network: each item
    carries the case's global volumes and a crop; step 1 runs on the global volume, its output
    is sampled at the crop's voxels (the pipeline's upsampling, done with ``grid_sample`` so
    it is differentiable) as step 2's second channel, and the loss is step 2's plus
    ``w_step1`` times step 1's own.
    """

    def __init__(
        self, config: dict[str, Any], stage: int, step1_network: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.cfg = FitConfig.from_dict(config)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        net_config = network_config(self.cfg.method, stage)
        if stage == 2 and self.cfg.method.step1_enabled and step1_network is None:
            raise ValueError("stage 2 of a two-step model needs the step-1 network config")
        self.save_hyperparameters(
            {
                "config": config,
                "stage": stage,
                "network": net_config.to_dict(),
                "step1_network": step1_network if stage == 2 else None,
            }
        )
        self.automatic_optimization = False
        self.stage = stage
        self.generator = RUNet(net_config)
        self.step1_net: RUNet | None = None
        self.joint = stage == 2 and self.cfg.method.joint
        if stage == 2 and step1_network is not None:
            # Sequential: a frozen copy of the trained step-1 network, for validation (the real pipeline)
            # and export. Joint: trained together with the generator.
            self.step1_net = RUNet(RUNetConfig.from_dict(step1_network))
            if not self.joint:
                self.step1_net.requires_grad_(False)
                self.step1_net.eval()
        self.discriminator: Discriminator3D | None = None
        if self.cfg.loss.beta > 0:
            d_in = 2 if self.cfg.loss.disc_conditional else 1
            self.discriminator = Discriminator3D(
                in_channels=d_in, base=self.cfg.loss.disc_base, levels=self.cfg.loss.disc_levels
            )
        dw = self.cfg.method.difference_weighting
        self.apply_dw = dw.enabled and stage == self.cfg.method.final_stage()
        # only the paper's form is differentiable; the released form is applied at inference only
        self.dw_in_loss = self.apply_dw and dw.form == "paper"
        self.loss_weights = LossWeights(
            alpha=self.cfg.loss.alpha,
            ssim=self.cfg.loss.w_ssim,
            pearson=self.cfg.loss.w_pearson,
            cosine=self.cfg.loss.w_cosine,
        )
        self.val_cases: list[CachedCase] = []
        self._val_scores: dict[int, float] = {}
        self._pipeline: FusionPipeline | None = None

    # ------------------------------------------------------------------ training

    def train(self, mode: bool = True) -> FusionModule:
        """Keep the frozen step-1 network in eval mode whatever Lightning toggles."""
        super().train(mode)
        if self.step1_net is not None and not self.joint:
            self.step1_net.eval()
        return self

    def on_train_start(self) -> None:
        """Per-rank, per-resume random stream for crops and flips drawn in the main process.

        ``seed_everything`` gives every rank the same seed (identical initialization), and a
        resumed run would replay the crops of step 0; mixing in the rank and the step avoids both.
        Loader workers are seeded separately by Lightning (rank-aware).
        """
        sequence = np.random.SeedSequence([self.cfg.optimiser.seed, self.global_rank, self.global_step])
        torch.manual_seed(int(sequence.generate_state(1)[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output after DW when this stage's output is the model's final one."""
        out = self.generator(x).float()
        if self.dw_in_loss:
            max_filter = self.cfg.method.difference_weighting.train_max_filter
            out = apply_difference_weighting(x[:, :1].float(), out, max_filter)
        return out

    def _disc_input(self, inp: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        return torch.cat([inp, candidate], dim=1) if self.cfg.loss.disc_conditional else candidate

    def _joint_inputs(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Step 1 on the global volumes, its output sampled at the crops: ``(x, y, step-1 loss, parts)``."""
        x_glob, y_glob, x_patch, y_patch, grid = batch
        assert self.step1_net is not None
        out1 = self.step1_net(x_glob).float()
        loss1, parts1 = reconstruction_loss(out1, y_glob, self.loss_weights)
        mode = Step1ModeRule(self.cfg.method.step1_mode)  # the pipeline's arithmetic (fmc.step1_mode)
        change = mode.change(out1, x_glob.float())
        guide = F.grid_sample(change, grid, mode="bilinear", padding_mode="border", align_corners=False)
        guide = mode.apply(guide, x_patch.float())
        parts = {f"step1_{k}": v for k, v in parts1.items()}
        return torch.cat([x_patch, guide.to(x_patch.dtype)], dim=1), y_patch, loss1, parts

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        step1_loss, step1_parts = None, {}
        if self.joint:
            x, y, step1_loss, step1_parts = self._joint_inputs(batch)
        else:
            x, y = batch
        optimizers = self.optimizers()
        if isinstance(optimizers, list):
            opt_g, opt_d = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        else:
            opt_g, opt_d = optimizers, None
        inp = x[:, :1].detach().float()  # the view itself: no gradient (in joint mode x has a graph)
        pred = self(x)
        loss, parts = reconstruction_loss(pred, y, self.loss_weights)
        if step1_loss is not None:
            loss = loss + self.cfg.loss.w_step1 * step1_loss
            parts.update(step1_parts)
        adversarial = self.discriminator is not None and self.global_step >= self.cfg.loss.gan_warmup_steps
        if adversarial:
            assert self.discriminator is not None
            self.discriminator.requires_grad_(False)
            parts["adv"] = generator_adversarial_loss(
                self.discriminator(self._disc_input(inp, pred)), self.cfg.loss.gan_mode
            )
            loss = loss + self.cfg.loss.beta * parts["adv"]
            self.discriminator.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.optimiser.grad_clip > 0:
            self.clip_gradients(
                opt_g, gradient_clip_val=self.cfg.optimiser.grad_clip, gradient_clip_algorithm="norm"
            )
        opt_g.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        logs = {f"train/{name}": value.detach() for name, value in parts.items()}
        logs["train/loss"] = loss.detach()
        if self.discriminator is not None and opt_d is not None:
            real = self.discriminator(self._disc_input(inp, y.float()))
            fake = self.discriminator(self._disc_input(inp, pred.detach()))
            d_loss = discriminator_loss(real, fake, self.cfg.loss.gan_mode)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.cfg.optimiser.grad_clip > 0:
                self.clip_gradients(
                    opt_d, gradient_clip_val=self.cfg.optimiser.grad_clip, gradient_clip_algorithm="norm"
                )
            # The raw optimizer, so global_step keeps counting generator steps only.
            opt_d.optimizer.step()
            logs["train/d_loss"] = d_loss.detach()
        logs["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("loss", logs["train/loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss.detach()

    def configure_optimizers(self) -> Any:
        params = list(self.generator.parameters())
        if self.joint and self.step1_net is not None:
            params += list(self.step1_net.parameters())
        opt_g = torch.optim.AdamW(
            params, lr=self.cfg.optimiser.lr, weight_decay=self.cfg.optimiser.weight_decay
        )
        total = self.cfg.optimiser.max_steps
        if self.cfg.optimiser.lr_schedule == "cosine" and total > 0:

            def factor(step: int) -> float:
                # Cosine from 1 to 0.01 over max_steps; flat after it (a resume may raise max_steps).
                progress = min(step, total) / total
                return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

        else:

            def factor(step: int) -> float:
                return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
        optimizers = [opt_g]
        if self.discriminator is not None:
            optimizers.append(
                torch.optim.AdamW(
                    self.discriminator.parameters(),
                    lr=self.cfg.optimiser.d_lr,
                    betas=(0.5, 0.999),
                    weight_decay=self.cfg.optimiser.weight_decay,
                )
            )
        return optimizers, [{"scheduler": scheduler, "interval": "step"}]

    # ---------------------------------------------------------------- validation

    def pipeline_config(self) -> PipelineConfig:
        """The inference pipeline as it will run this stage's model (validation and export agree)."""
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        return pipeline_config_of(self.cfg, self.stage, self.device, precision, with_dw=self.apply_dw)

    def model_set(self) -> ModelSet:
        """The networks of this module as the pipeline loads them from disk."""
        step1 = step2 = None
        if self.stage == 1:
            step1 = LoadedModel(self.generator, self.card(1), Path("<training>"))
        else:
            step2 = LoadedModel(self.generator, self.card(2), Path("<training>"))
            if self.step1_net is not None:
                step1 = LoadedModel(self.step1_net, self.card(1), Path("<training>"))
        return ModelSet(step1=step1, step2=step2, folder=Path("<training>"))

    def card(self, step: int, **extra: Any) -> ModelCard:
        """Model card of one exported network (the training details are filled in by export)."""
        config = self.hparams["step1_network"] if step == 1 and self.stage == 2 else self.hparams["network"]
        extra.setdefault("training", {"pipeline": self.cfg.method.inference_settings().to_card()})
        return ModelCard(
            step=step,
            preset=self.cfg.method.preset,
            config=dict(config),
            normalization=dict(CARD_NORMALIZATION),
            **extra,
        )

    def on_validation_epoch_start(self) -> None:
        self._val_scores = {}
        self._pipeline = FusionPipeline(self.model_set(), self.pipeline_config(), self.device)

    def validation_step(self, item: dict[str, Any], batch_idx: int) -> None:
        case = CachedCase.from_dict(item["case"])
        assert self._pipeline is not None
        if self.cfg.validation.val_mode == "full":
            inp, pred, target = self._validate_full(case)
        else:
            inp, pred, target = self._validate_iso(case)
        score = float(n_ssim(pred, target, inp, device=self.device))
        self._val_scores[int(item["index"])] = score
        if int(item["index"]) < self.cfg.validation.preview_cases:
            self._preview(case, inp, pred, target, score)

    def _validate_iso(self, case: CachedCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pipeline's isotropic core on the cached 0.6 um volumes (no resampling round trip)."""
        cache = self.cfg.data.cache_dir()
        inp = np.asarray(case.load(cache, "input", mmap=False), dtype=np.float32)
        target = np.asarray(case.load(cache, "target", mmap=False), dtype=np.float32)
        assert self._pipeline is not None
        pred = self._pipeline.predict_isotropic(torch.from_numpy(inp).to(self.device))
        return inp, pred.float().cpu().numpy(), target

    def _validate_full(self, case: CachedCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole pipeline on the source TIFFs, scored on the original grid as the challenge does."""
        from fmc.io import read_case

        angle = read_case(Path(case.sources["angle"]))
        fused = read_case(Path(case.sources["fused"]))
        assert self._pipeline is not None
        pred, _ = self._pipeline.run(angle.volume, case.spacing)
        return angle.volume, pred, fused.volume

    def _preview(
        self, case: CachedCase, inp: np.ndarray, pred: np.ndarray, target: np.ndarray, score: float
    ) -> None:
        """MIP PNG (input | prediction | target) to the run folder and, when present, TensorBoard."""
        image = mip_panel(inp, pred, target)
        folder = Path(self.cfg.data.run_dir) / f"step{self.stage}" / "previews"
        name = f"epoch{self.current_epoch:04d}_step{self.global_step:07d}_{case.id}.png"
        save_png(folder / name, image)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"val_mip/{case.id}", image, self.global_step, dataformats="HW")
        log.info("validation preview %s (N_SSIM %.4f)", folder / name, score)

    def on_validation_epoch_end(self) -> None:
        """Mean N_SSIM over validation cases, exact under DDP (padded duplicates are averaged away)."""
        self._pipeline = None
        n = len(self.val_cases)
        if n == 0:
            return
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        counts = torch.zeros(n, dtype=torch.float64, device=self.device)
        for index, score in self._val_scores.items():
            sums[index] += score
            counts[index] += 1
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts > 0
        if not bool(seen.any()):
            return
        per_case = (sums[seen] / counts[seen]).float()
        metrics = {"val/n_ssim": per_case.mean()}
        channels = np.array([c.channel for c in self.val_cases])[seen.cpu().numpy()]
        for channel in sorted(set(channels.tolist())):
            mask = torch.from_numpy(channels == channel).to(self.device)
            metrics[f"val/n_ssim_{channel}"] = per_case[mask].mean()
        self.log_dict(metrics, prog_bar=True, sync_dist=False)
        log.info(
            "validation step %d: %s over %d case(s)",
            self.global_step,
            " ".join(f"{k}={float(v):.4f}" for k, v in metrics.items()),
            int(seen.sum()),
        )
