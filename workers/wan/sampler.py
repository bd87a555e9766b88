"""Text-to-video sampling with classifier-free guidance batched: the conditional and unconditional transformer
passes of each step run as ONE forward of batch 2 (cond and uncond latents stacked, their text embeddings
stacked), instead of diffusers' ``WanPipeline`` running them one after the other.

The math is the pipeline's: the same prompt encoding (its own ``encode_prompt``), the same latents from the
same generator (its own ``prepare_latents``), the same scheduler calls, the same guidance formula
``uncond + g * (cond - uncond)`` on the transformer's output dtype, the same VAE decode and postprocessing.
Only the batching differs, so outputs match the two-pass pipeline up to matmul summation order. Each sample of
the batch is independent in the Wan 2.1 transformer (no attention across the batch, per-sample timestep
embedding, text embeddings padded to the same length by ``encode_prompt``).

Why: the single-frame job is launch-bound (one kernel launch per op costs more host time than the GPU spends
on it), so one batch-2 pass is nearly half the host time of two batch-1 passes; long videos get bigger matmuls.

``BatchedCfgSampler(pipe)(**kwargs)`` takes the subset of ``WanPipeline.__call__``'s keywords the worker uses
and returns a ``WanPipelineOutput``, so it drops in where the pipeline was called. Only Wan 2.1-style
pipelines are handled (one transformer, no ``boundary_ratio``, no ``expand_timesteps``); ``supports()`` says so
and the caller keeps the plain pipeline otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

StepEnd = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""diffusers' ``callback_on_step_end(pipe, index, timestep, {"latents": ...}) -> {...}``."""


class BatchedCfgSampler:
    """One job's T2V run around a (per-job) ``WanPipeline``; ``scheduler`` is the pipeline's."""

    def __init__(self, pipe: WanPipeline):
        if not self.supports(pipe):
            raise ValueError("batched CFG handles Wan 2.1 text-to-video pipelines only")
        self.pipe = pipe

    @staticmethod
    def supports(pipe: Any) -> bool:
        config = getattr(pipe, "config", {})
        return (type(pipe) is WanPipeline and getattr(pipe, "transformer", None) is not None
                and getattr(pipe, "transformer_2", None) is None and config.get("boundary_ratio") is None
                and not config.get("expand_timesteps", False))

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @torch.no_grad()
    def __call__(self, *, prompt: str, negative_prompt: str | None = None, height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 generator: torch.Generator | None = None, output_type: str = "np",
                 callback_on_step_end: StepEnd | None = None, max_sequence_length: int = 512) -> WanPipelineOutput:
        pipe = self.pipe
        pipe.check_inputs(prompt, negative_prompt, height, width, None, None, ["latents"], None)
        height, width, num_frames = self._fit(height, width, num_frames)
        device = pipe._execution_device
        transformer = pipe.transformer
        dtype = transformer.dtype
        cfg = guidance_scale > 1.0   # WanPipeline.do_classifier_free_guidance

        positive, negative = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1, max_sequence_length=max_sequence_length, device=device)
        # Row 0 conditional, row 1 unconditional; both padded to max_sequence_length by encode_prompt.
        text = torch.cat([positive, negative]).to(dtype) if cfg else positive.to(dtype)
        rows = text.shape[0]

        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        latents = pipe.prepare_latents(1, transformer.config.in_channels, height, width, num_frames,
                                       torch.float32, device, generator, None)
        scheduler.set_begin_index(0)   # as the pipeline: no device-to-host sync for the step index

        with pipe.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                model_input = latents.to(dtype)
                if cfg:
                    model_input = torch.cat([model_input, model_input])
                out = transformer(hidden_states=model_input, timestep=t.expand(rows), encoder_hidden_states=text,
                                  return_dict=False)[0]
                if cfg:
                    cond, uncond = out.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                else:
                    noise = out
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    latents = callback_on_step_end(pipe, i, t, {"latents": latents}).pop("latents", latents)
                bar.update()

        frames = latents if output_type == "latent" else self._decode(latents, output_type)
        pipe.maybe_free_model_hooks()
        return WanPipelineOutput(frames=frames)

    def _fit(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """The pipeline's own rounding: frames to 4k+1, height/width to multiples of VAE scale × patch."""
        pipe = self.pipe
        temporal = pipe.vae_scale_factor_temporal
        if num_frames % temporal != 1:
            num_frames = num_frames // temporal * temporal + 1
        patch = pipe.transformer.config.patch_size
        h_step, w_step = pipe.vae_scale_factor_spatial * patch[1], pipe.vae_scale_factor_spatial * patch[2]
        return height // h_step * h_step, width // w_step * w_step, max(num_frames, 1)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """``WanPipeline``'s decode: un-normalise with the VAE's latent statistics, decode, postprocess."""
        vae = self.pipe.vae
        latents = latents.to(vae.device, dtype=vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device,
                                                                                          latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type=output_type)
