"""The resident Wan 2.1 models: the text-to-video pipeline and, optionally, a VACE transformer that shares
its text encoder, tokenizer and VAE (one copy of each in memory).

Loaded once (``load()``) and kept. On CUDA the text encoder and transformer run in bf16 with the
transformer's norm, time-embedding and RoPE layers kept in fp32 (diffusers' ``_keep_in_fp32_modules``) and
the VAE in fp32; on CPU everything is fp32. Each job gets its own scheduler, built from the loaded
scheduler config (UniPC or DPM++ flow-matching, with the job's flow shift), and a throwaway pipeline object
around the shared modules, so no job mutates what another job sees. Text-to-video jobs run through
``BatchedCfgSampler`` (cond + uncond in one batch-2 transformer pass; ``WAN_BATCHED_CFG``, on by default) unless
it is turned off, in which case diffusers' ``WanPipeline`` runs the two passes one after the other; VACE jobs
always run diffusers' ``WanVACEPipeline``.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)

from common.settings import Settings
from workers.core.errors import ErrorType, FatalWorkerError, RetryableError, WorkerError
from workers.gpu import fp8 as fp8_mod
from workers.gpu import graphed, regional
from workers.gpu.device import resolve_device

from .references import VaceConditioning
from .request import Solver
from .sampler import BatchedCfgSampler

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""``on_step(steps_done, steps_total)``."""


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    solver: Solver = Solver.UNIPC
    shift: float = 5.0


def make_scheduler(base_config: Any, solver: Solver, shift: float):
    """A fresh flow-matching scheduler for one job, from the checkpoint's scheduler config."""
    common = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": float(shift)}
    if solver is Solver.DPMPP:
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++",
                                                       solver_order=2, **common)
    return UniPCMultistepScheduler.from_config(base_config, **common)


def load_t2v(path: Path, device: torch.device, dtype: torch.dtype) -> WanPipeline:
    """The T2V pipeline from a diffusers folder, offline; the VAE always in fp32."""
    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True,
                                       dtype={"default": dtype, "vae": torch.float32})
    pipe.to(device)
    return pipe


def load_vace(path: Path, t2v: WanPipeline, device: torch.device, dtype: torch.dtype) -> WanVACEPipeline:
    """A VACE pipeline whose transformer comes from ``path`` (a diffusers VACE folder or its
    ``transformer`` subfolder) and whose text encoder, tokenizer and VAE are ``t2v``'s own objects."""
    subfolder = "transformer" if (Path(path) / "transformer").is_dir() else None
    transformer = WanVACETransformer3DModel.from_pretrained(str(path), subfolder=subfolder,
                                                            local_files_only=True, dtype=dtype)
    transformer.to(device)
    return WanVACEPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                           scheduler=t2v.scheduler, transformer=transformer)


class WanModels:
    """Owns the loaded pipelines; ``generate()`` is the one entry point for a denoising run."""

    def __init__(self, *, model_path: Path | None, vace_path: Path | None = None, device: str = "auto",
                 compile_transformer: bool = False, progress_bar: bool = False, batched_cfg: bool = True,
                 cuda_graphs: bool = False, compile_blocks: bool = False, fp8: bool = False,
                 fuse_qkv: bool = False):
        self.model_path = model_path
        self.fuse_qkv = fuse_qkv        # WAN_FUSE_QKV: one q/k/v (self) and k/v (cross) projection per attention
        self.fp8 = fp8                  # WAN_FP8: the transformers' block linears in FP8, before compile and graphs
        self.compile_blocks = compile_blocks   # COMPILE_BLOCKS: the transformers' blocks compiled in place
        self.compiled_blocks = 0
        self.cuda_graphs = cuda_graphs  # CUDA_GRAPHS: the T2V transformer replayed per shape (small shapes)
        self._graphs: graphed.ForwardGraphs | None = None
        self.batched_cfg = batched_cfg  # T2V: cond + uncond as one batch-2 transformer pass
        self.progress_bar = progress_bar  # a tqdm bar over denoising steps (the CLI; workers report progress)
        self.vace_path = vace_path
        self.device_name = device
        self.compile_transformer = compile_transformer
        self._t2v: WanPipeline | None = None
        self._vace: WanVACEPipeline | None = None
        self._lock = threading.RLock()
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, progress_bar: bool = False) -> WanModels:
        """The one way the worker and ``wan_generate.py`` build their models, so both honour every setting;
        only the progress bar (the CLI's) is not a setting."""
        return cls(model_path=settings.wan_model_path, vace_path=settings.wan_vace_model_path,
                   device=settings.device, compile_transformer=settings.torch_compile, progress_bar=progress_bar,
                   batched_cfg=settings.wan_batched_cfg, cuda_graphs=settings.cuda_graphs,
                   compile_blocks=settings.compile_blocks, fp8=settings.wan_fp8, fuse_qkv=settings.wan_fuse_qkv)

    @property
    def options(self) -> dict[str, Any]:
        """The keywords these models were built with, e.g. to check that two ways of building them agree."""
        return {"model_path": self.model_path, "vace_path": self.vace_path, "device": self.device_name,
                "compile_transformer": self.compile_transformer, "progress_bar": self.progress_bar,
                "batched_cfg": self.batched_cfg, "cuda_graphs": self.cuda_graphs,
                "compile_blocks": self.compile_blocks, "fp8": self.fp8, "fuse_qkv": self.fuse_qkv}

    @property
    def loaded(self) -> bool:
        return self._t2v is not None

    @property
    def vace_available(self) -> bool:
        return self._vace is not None

    def load(self, which: str = "all") -> str:
        with self._lock:
            if self.model_path is None:
                raise FatalWorkerError("WAN_MODEL_PATH is not set")
            if not Path(self.model_path).is_dir():
                raise FatalWorkerError("the WAN model folder (WAN_MODEL_PATH) does not exist")
            self.device = resolve_device(self.device_name)
            if self.fp8:
                fp8_mod.require(self.device, "WAN_FP8")
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            loaded = []
            if self._t2v is None:
                self._adopt_t2v(self._guarded(load_t2v, "WAN", self.model_path, self.device, self.dtype))
                loaded.append("t2v")
            if which in ("all", "vace") and self.vace_path is not None and self._vace is None:
                if not Path(self.vace_path).is_dir():
                    raise FatalWorkerError("the WAN VACE model folder (WAN_VACE_MODEL_PATH) does not exist")
                self._vace = self._guarded(load_vace, "WAN VACE", self.vace_path, self._t2v, self.device,
                                           self.dtype)
                self._prepare(self._vace.transformer)
                loaded.append("vace")
            return f"loaded {', '.join(loaded)}" if loaded else "already loaded"

    def unload(self, which: str = "all") -> str:
        with self._lock:
            freed = []
            if self._vace is not None:
                self._vace = None
                freed.append("vace")
            if which != "vace" and self._t2v is not None:
                graphed.uninstall(self._t2v.transformer)
                self._t2v = self._graphs = None
                freed.append("t2v")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return f"unloaded {', '.join(freed)}" if freed else "nothing was loaded"

    def status(self) -> dict[str, Any]:
        return {"loaded": {"t2v": self._t2v is not None, "vace": self._vace is not None},
                "vace_configured": self.vace_path is not None,
                "device": str(self.device) if self.device else None,
                "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
                "solvers": [s.value for s in Solver], "batched_cfg": self.batched_cfg,
                "compiled_blocks": self.compiled_blocks, "fp8_layers": self.fp8_layers(),
                "cuda_graphs": self._graphs.describe() if self._graphs is not None else None}

    def generate(self, spec: GenerationSpec, conditioning: VaceConditioning | None = None,
                 on_step: StepCallback | None = None) -> np.ndarray:
        """Run one generation; frames as ``uint8`` ``(num_frames, height, width, 3)``."""
        with self._lock:
            pipe = self._job_pipeline(spec, conditioning is not None)
            kwargs: dict[str, Any] = dict(
                prompt=spec.prompt, negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
                num_frames=spec.num_frames, num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(spec.seed), output_type="pt",
            )
            if on_step is not None:
                def callback(_pipe, index, _timestep, tensors):
                    on_step(index + 1, spec.steps)
                    return {}
                kwargs["callback_on_step_end"] = callback
            if conditioning is not None:
                kwargs.update(conditioning.kwargs())
                kwargs.update(self._embeddings(spec))
            try:
                with torch.inference_mode():
                    frames = pipe(**kwargs).frames[0]
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                raise RetryableError("out of GPU memory while generating", ErrorType.OOM_ERROR) from None
            return to_uint8(frames)

    def _job_pipeline(self, spec: GenerationSpec, vace: bool) -> WanPipeline | WanVACEPipeline | BatchedCfgSampler:
        """What this job calls with the pipeline keywords: a fresh pipeline around the shared modules, or
        for T2V with batched CFG on, the batched sampler around it."""
        base = self._vace if vace else self._t2v
        if base is None:
            if vace:
                raise WorkerError("reference frames need the VACE model, which is not loaded")
            raise RetryableError("the WAN model is not loaded", ErrorType.MODEL_LOAD_ERROR)
        scheduler = make_scheduler(base.scheduler.config, spec.solver, spec.shift)
        pipe = type(base)(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                          scheduler=scheduler, transformer=base.transformer)
        pipe.set_progress_bar_config(disable=not self.progress_bar, desc="denoising")
        if not vace and self.batched_cfg and latent_tokens(spec) <= BATCHED_CFG_MAX_TOKENS \
                and BatchedCfgSampler.supports(pipe):
            return BatchedCfgSampler(pipe)
        return pipe

    def _embeddings(self, spec: GenerationSpec) -> dict[str, Any]:
        """Prompt embeddings from the shared text encoder, through the T2V pipeline's encoder. VACE gets
        these instead of text: diffusers 0.42's ``WanVACEPipeline`` cleans prompts with ``ftfy``
        unconditionally (a ``NameError`` without it), while ``WanPipeline`` treats ftfy as optional."""
        assert self._t2v is not None
        positive, negative = self._t2v.encode_prompt(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt,
            do_classifier_free_guidance=spec.guidance_scale > 1.0, num_videos_per_prompt=1,
            max_sequence_length=512, device=self._t2v._execution_device)
        return {"prompt": None, "negative_prompt": None, "prompt_embeds": positive,
                "negative_prompt_embeds": negative}

    def _adopt_t2v(self, pipe: WanPipeline) -> None:
        """Make a loaded T2V pipeline the resident one: quiet, compiled or graphed as the settings say."""
        self._t2v = pipe
        pipe.set_progress_bar_config(disable=True)
        self._prepare(pipe.transformer)
        if self.cuda_graphs and not self.compile_transformer:
            self._graphs = graphed.install(pipe.transformer, "WAN transformer", accept=small_latents)
        if self.compiled_blocks:
            warm_up_blocks(pipe.transformer)

    def _prepare(self, transformer: torch.nn.Module) -> None:
        """WAN_FUSE_QKV, WAN_FP8, then the compile: the compiled blocks and the CUDA graphs must see the final
        layers (the fused projections, in fp8 when both are on)."""
        if self.fuse_qkv:
            transformer.fuse_qkv_projections()
        if self.fp8:
            convert_fp8(transformer)
        self._maybe_compile(transformer)

    def fp8_layers(self) -> int:
        """How many linear layers of the loaded transformers are FP8 now."""
        pipes = [pipe for pipe in (self._t2v, self._vace) if pipe is not None]
        return sum(1 for pipe in pipes for p in pipe.transformer.parameters() if fp8_mod.is_float8(p))

    def _maybe_compile(self, module: torch.nn.Module) -> None:
        """TORCH_COMPILE: the whole transformer (compiled on its first call); else COMPILE_BLOCKS: its blocks."""
        if self.device is None or self.device.type != "cuda":
            return
        if self.compile_transformer:
            module.compile()
        elif self.compile_blocks:
            self.compiled_blocks += regional.compile_blocks(module, COMPILED_BLOCKS)

    @staticmethod
    def _guarded(loader, what: str, *args):
        try:
            return loader(*args)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            log.error("%s model failed to load: %s: %s", what, type(exc).__name__, str(exc)[:500],
                      exc_info=True)   # the operator's log: the cause, not only its type
            raise FatalWorkerError(f"{what} model could not be loaded ({type(exc).__name__})") from None


# Batched CFG pays where the transformer is launch-bound: one 832×480 frame (1,560 tokens) went from 2.60 s to
# 1.17 s on an H100; at 81 frames (32,760 tokens) the step is compute-bound (1.30 s either way) and the
# batch-2 kernels only add bf16 drift (2e-2 relative against two passes). Measured by `python -m bench wan`.
BATCHED_CFG_MAX_TOKENS = 8192


# Compiled in place when COMPILE_BLOCKS is on (workers/gpu/regional.py): one 81-frame transformer pass
# 0.646 -> 0.532 s on an H100 (`python -m bench levers`, WAN case), ~5 s of compile per variant; VACE's own
# blocks compile on its first job.
COMPILED_BLOCKS = ("WanTransformerBlock", "WanVACETransformerBlock")


def convert_fp8(transformer: torch.nn.Module) -> int:
    """WAN_FP8: the bf16 linear layers of the transformer's blocks (attention projections, feed-forward) to FP8,
    in place; the time embedding, patch embedding and output projection stay as loaded, and so do the fp32
    keep-modules (torchao refuses them). How many layers; ``FatalWorkerError`` when torchao refuses."""
    selection = fp8_mod.select(transformer, COMPILED_BLOCKS)
    if not selection.names:
        log.warning("WAN_FP8: no block linear layer can be converted (%d kept, e.g. %s); the transformer stays bf16",
                    len(selection.kept), next(iter(selection.kept.values()), "no linear layers"))
    try:
        return fp8_mod.quantise(transformer, selection)
    except RuntimeError as exc:
        log.error("WAN_FP8: %s", exc)
        raise FatalWorkerError("WAN_FP8: the transformer's linear layers could not be converted to FP8") from None


def warm_up_blocks(transformer: torch.nn.Module) -> None:
    """Compile the blocks before the first job: a block sees (batch, tokens, channels), never the frame count,
    and dynamo specialises a batch of 1 (a video's passes, or no CFG) apart from 2 (a batched-CFG frame), so
    one small call of each compiles every variant a job needs. Runs the class's forward, not the CUDA-graph
    wrapper: no graph is kept for these shapes."""
    config, device, dtype = transformer.config, transformer.device, transformer.dtype   # as the samplers feed it
    started = time.monotonic()
    with torch.inference_mode():
        for batch in (2, 1):
            type(transformer).forward(
                transformer,
                hidden_states=torch.zeros(batch, config.in_channels, 1, 16, 16, device=device, dtype=dtype),
                timestep=torch.full((batch,), 500.0, device=device),
                encoder_hidden_states=torch.zeros(batch, 512, config.text_dim, device=device, dtype=dtype),
                return_dict=False)
    log.info("WAN transformer blocks compiled in %.1f s", time.monotonic() - started)


def small_latents(leaves: list[Any]) -> bool:
    """Graph a transformer call only at launch-bound sizes (what batched CFG covers, e.g. single frames): a
    long video is compute-bound, and its graph would keep gigabytes of activations in the pool."""
    videos = [x for x in leaves if isinstance(x, torch.Tensor) and x.ndim == 5]
    return bool(videos) and all(v.shape[2] * (v.shape[3] // 2) * (v.shape[4] // 2) <= BATCHED_CFG_MAX_TOKENS
                                for v in videos)


def latent_tokens(spec: GenerationSpec) -> int:
    """Transformer sequence length of a job: latent frames × (H/16) × (W/16) (VAE ×8/×4, patch 1×2×2)."""
    return ((spec.num_frames - 1) // 4 + 1) * (spec.height // 16) * (spec.width // 16)


def to_uint8(frames: Any) -> np.ndarray:
    """Pipeline output in [0, 1] → ``uint8`` frames ``(F, H, W, 3)``. A ``pt`` output ``(F, 3, H, W)`` is
    converted where it lies (the GPU) and copied once as bytes: 4× less traffic than float frames."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 3:
            frames = frames[None]
        return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    array = np.asarray(frames, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
