"""A diffusers SDXL pipeline written as one original (Stability / ldm key layout) ``.safetensors`` checkpoint,
the format the production pod has, so ``from_single_file(..., config=<folder>)`` is exercised offline. It is the
reverse of diffusers' own ldm → diffusers converters, for the block structure of the demo models."""
from __future__ import annotations

import os
import re
from pathlib import Path

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.*)")


def unet_to_ldm(unet) -> dict:
    """diffusers UNet2DConditionModel -> ldm `model.diffusion_model.*` (inverse of convert_ldm_unet_checkpoint)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    top = {**MAP["unet"]["layers"], **MAP["unet"]["addition_embed_type"]}
    n = unet.config.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        if key in top:
            out[top[key]] = value
            continue
        kind, blk, part, j, rest = _BLOCK.fullmatch(key).groups()
        j = int(j)
        if part == "resnets":
            head, tail = rest.split(".", 1)
            rest = f"{_RESNET_TO_LDM.get(head, head)}.{tail}"
        sub = 0 if part == "resnets" else 1
        if kind == "mid_block":
            new = f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
        elif kind == "down_blocks" and part == "downsamplers":
            new = f"input_blocks.{n * (int(blk) + 1)}.0.op.{rest.removeprefix('conv.')}"
        elif kind == "down_blocks":
            new = f"input_blocks.{n * int(blk) + j + 1}.{sub}.{rest}"
        elif part == "upsamplers":
            has_attn = "CrossAttn" in unet.config.up_block_types[int(blk)]
            new = f"output_blocks.{n * int(blk) + n - 1}.{2 if has_attn else 1}.{rest}"
        else:
            new = f"output_blocks.{n * int(blk) + j}.{sub}.{rest}"
        out[new] = value
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(vae) -> dict:
    """diffusers AutoencoderKL -> ldm `first_stage_model.*` (inverse of convert_ldm_vae_checkpoint)."""
    last = len(vae.config.block_out_channels) - 1
    out = {}
    for key, value in vae.state_dict().items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last - int(m[1])}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{last - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:  # ldm attention projections are 1x1 convolutions
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                k = k.replace(a, b)
            value = value[:, :, None, None] if value.ndim == 2 else value
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + k] = value
    return out


def clip_to_ldm(te1, te2) -> dict:
    """text_encoder -> `conditioner.embedders.0.transformer.text_model.*` (HF CLIP layout, as in SDXL checkpoints);
    text_encoder_2 -> `conditioner.embedders.1.model.*` (OpenCLIP layout, fused in_proj, transposed projection)."""
    out = {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in te1.state_dict().items() if not k.endswith("position_ids")}
    p = "conditioner.embedders.1.model."
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding"}
    qkv: dict[str, dict[str, object]] = {}
    for key, value in te2.state_dict().items():
        k = key.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue
        if k == "text_projection.weight":
            out[p + "text_projection"] = value.T.contiguous()
        elif k in fixed:
            out[p + fixed[k]] = value
        elif k.startswith("final_layer_norm."):
            out[p + "ln_final." + k.split(".", 1)[1]] = value
        else:
            i, rest = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", k).groups()
            m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if m:
                qkv.setdefault(f"{p}transformer.resblocks.{i}.attn.in_proj_{m[2]}", {})[m[1]] = value
                continue
            for a, b in (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                rest = rest.replace(a, b)
            out[f"{p}transformer.resblocks.{i}.{rest}"] = value
    import torch

    out.update({k: torch.cat([d["q"], d["k"], d["v"]]) for k, d in qkv.items()})
    return out


def sdxl_to_single_file(pipe, path: Path) -> None:
    from safetensors.torch import save_file

    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder, pipe.text_encoder_2)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
