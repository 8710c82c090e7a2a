"""Single-file checkpoints (`sdrt export FILE`): tiny pipelines written as one .safetensors in the original Stable
Diffusion layout (CompVis for SD 1.x, SGM for SDXL), with their VAE baked in and without it (then --vae), exported
offline with --config pointing at the tiny diffusers folder, and the engine's images compared with the diffusers
pipeline loaded from that folder (within 1/255), so a wrong key map anywhere cannot pass.

The original layout is written here as the inverse of diffusers' documented single-file conversion
(diffusers/loaders/single_file_utils.py: DIFFUSERS_TO_LDM_MAPPING, convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), never by calling them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline

from sdrt.runtime.errors import UserError
from sdrt.runtime.request import Request

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD_CLIP = "cond_stage_model.transformer."  # SD 1.x: CLIP ViT-L in transformers' own names
XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL's two

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def unet_keys(unet) -> dict[str, str]:
    """{diffusers name: original name} for a UNet2DConditionModel: input_blocks count conv_in, then per down block
    its layers (resnet .0, attention .1) and its down-sampler (.0.op); output_blocks hold layers_per_block + 1 layers
    per up block, the up-sampler after the last one's resnet (.1.conv) or attention (.2.conv)."""
    cfg = unet.config
    per = cfg.layers_per_block + 1
    out = {}
    for name in unet.state_dict():
        top, _, param = name.rpartition(".")
        parts = name.split(".")
        if top in _UNET_TOP:
            out[name] = f"{_UNET_TOP[top]}.{param}"
        elif parts[0] == "down_blocks":
            b, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                out[name] = f"input_blocks.{1 + b * per + cfg.layers_per_block}.0.op.{parts[-1]}"
            else:
                i = 1 + b * per + int(parts[3])
                out[name] = f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "upsamplers":
                attends = hasattr(unet.up_blocks[b], "attentions")
                out[name] = f"output_blocks.{b * per + per - 1}.{2 if attends else 1}.conv.{parts[-1]}"
            else:
                i = b * per + int(parts[3])
                out[name] = f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif parts[0] == "mid_block":  # resnets.0 → middle_block.0, attentions.0 → .1, resnets.1 → .2
            k, rest = int(parts[2]), ".".join(parts[3:])
            out[name] = f"middle_block.{2 * k}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no original name for the UNet's {name}")
    return out


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_keys(vae) -> dict[str, str]:
    """{diffusers name: original name} for an AutoencoderKL: decoder up blocks counted from the bottom (up.{n-1-i}),
    mid-block resnets block_1/block_2, attn_1 with q/k/v/proj_out (1×1 convs in the original), nin_shortcut."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for name in vae.state_dict():
        parts = name.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[name] = name
        elif parts[1] in ("conv_in", "conv_out"):
            out[name] = name
        elif parts[1] == "conv_norm_out":
            out[name] = f"{side}.norm_out.{parts[-1]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            block = f"{side}.down.{i}" if parts[1] == "down_blocks" else f"{side}.up.{n_up - 1 - i}"
            if kind in ("downsamplers", "upsamplers"):
                out[name] = f"{block}.{'downsample' if kind == 'downsamplers' else 'upsample'}.conv.{parts[-1]}"
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                out[name] = f"{block}.block.{parts[4]}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            out[name] = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            rest = ".".join(parts[4:])
            for ours, theirs in _VAE_ATTN:
                rest = rest.replace(ours + ".", theirs + ".", 1) if rest.startswith(ours + ".") else rest
            out[name] = f"{side}.mid.attn_1.{rest}"
        else:
            raise KeyError(f"no original name for the VAE's {name}")
    return out


def _vae_tensor(original: str, value: torch.Tensor) -> torch.Tensor:
    """The original VAE's attention projections are 1×1 convolutions (diffusers squeezes them to linear)."""
    if ".mid.attn_1." in original and original.rsplit(".", 1)[-1] == "weight" and value.ndim == 2:
        return value[:, :, None, None]
    return value


def clip_state(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (transformers' CLIPTextModel) keeps transformers' names under `prefix`, rooted at text_model.
    (transformers ≥ 5.6 saves CLIPTextModel without that level; the checkpoints people have carry it)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def open_clip_state(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (SDXL's second encoder) from a CLIPTextModelWithProjection: resblocks.N with ln_1/ln_2,
    attn.in_proj_{weight,bias} (q, k, v stacked), attn.out_proj, mlp.c_fc/c_proj; positional_embedding,
    token_embedding, ln_final and text_projection (the transpose of transformers' Linear weight)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    state.pop("embeddings.position_ids", None)
    for param in ("weight", "bias"):
        out[prefix + f"ln_final.{param}"] = state.pop(f"final_layer_norm.{param}")
    layers = encoder.config.num_hidden_layers
    for n in range(layers):
        ours, theirs = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[theirs + f"{b}.{param}"] = state.pop(f"{ours}{a}.{param}")
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out


def original_state(pipe, with_vae: bool = True) -> dict[str, torch.Tensor]:
    """The whole checkpoint of an SD 1.x or SDXL diffusers pipeline, in the original layout."""
    out = {UNET + theirs: pipe.unet.state_dict()[ours] for ours, theirs in unet_keys(pipe.unet).items()}
    if with_vae:
        out |= {VAE + theirs: _vae_tensor(theirs, pipe.vae.state_dict()[ours])
                for ours, theirs in vae_keys(pipe.vae).items()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= clip_state(pipe.text_encoder, XL_CLIP) | open_clip_state(pipe.text_encoder_2, XL_OPEN_CLIP)
    else:
        out |= clip_state(pipe.text_encoder, SD_CLIP)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---- the tests ------------------------------------------------------------------------------------------------


def write_wide_sdxl(folder: Path) -> Path:
    """The tiny SDXL pipeline with its second text encoder 48 wide instead of 32. diffusers' single-file loader tells
    SDXL's two encoders apart by width (CLIP ViT-L 768, OpenCLIP bigG 1280; create_diffusers_clip_model_from_ldm
    loads embedders.0 into any encoder of its width), so two encoders of one width would load the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdrt.export.models.tiny import EOS, _unet, build_tiny_pipeline
    from sdrt.export.models.tiny_tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_tiny_pipeline("sdxl", Path(scratch), seed=1)
        first = pipe.text_encoder_2.config
        torch.manual_seed(2)
        wide = CLIPTextConfig(vocab_size=first.vocab_size, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
                              bos_token_id=first.bos_token_id, eos_token_id=first.eos_token_id, pad_token_id=1)
        pipe.register_modules(text_encoder_2=CLIPTextModelWithProjection(wide),
                              unet=_unet(pipe.text_encoder.config.hidden_size + 48, linear_proj=True, text_time=6))
        pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # CLIP's own files, as write_tiny_pipeline adds them
        write_clip_tokenizer(folder / name, pad_token="!" if name == "tokenizer_2" else EOS)
    return folder


@pytest.fixture(scope="module")
def sources(tiny_pipeline, tmp_path_factory):
    """family → (diffusers folder, checkpoint with its VAE, checkpoint without)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single-file")
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tiny_pipeline("sd15") if family == "sd15" else write_wide_sdxl(root / "sdxl-wide")
            pipe = DiffusionPipeline.from_pretrained(folder)
            files = []
            for with_vae in (True, False):
                files.append(root / f"{family}{'' if with_vae else '-novae'}.safetensors")
                save_file(original_state(pipe, with_vae), str(files[-1]))
            cache[family] = (folder, *files)
        return cache[family]

    return get


TXT2IMG = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # what the comparison runs


def _export(checkpoint: Path, folder: Path, out: Path, **extra) -> dict:
    from sdrt.export.exporter import ExportConfig, export

    return export(ExportConfig(model=str(checkpoint), output=out, precision="fp32", single_file_config=str(folder),
                               components=TXT2IMG, **extra))


def _same_image_as_the_folder(name: str, engine: Path, folder: Path) -> None:
    from sdrt.runtime.pipeline import Pipeline

    ref = reference_pipeline(folder)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    request = dict(prompt=("a photo of a cat",), steps=3, guidance=7.5, height=32, width=32, seed=11, sampler="euler")
    theirs = ref(["a photo of a cat"], num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                 generator=generators(11, 1), output_type="np").images
    ours = Pipeline.load(engine, backend="ort-cpu").generate(Request.of(**request))
    assert_same_images(name, ours, theirs)


def test_sd15_checkpoint_with_its_vae_exports_the_folder_s_model(sources, tmp_path):
    folder, checkpoint, _ = sources("sd15")
    manifest = _export(checkpoint, folder, tmp_path / "engine")  # family inferred from the tensor names
    assert manifest["family"] == "sd15"
    assert manifest["source"]["kind"] == "single_file"
    assert manifest["source"]["location"] == str(checkpoint.absolute())
    assert (manifest["source"]["family"], manifest["source"]["config"]) == ("sd15", str(folder.absolute()))
    _same_image_as_the_folder("single-file-sd15", tmp_path / "engine", folder)


def test_checkpoint_without_a_vae_is_refused_without_vae(sources, tmp_path):
    folder, _, bare = sources("sd15")
    with pytest.raises(UserError, match=r"cannot load sd15-novae.safetensors: .*needs --vae FOLDER_OR_FILE"):
        _export(bare, folder, tmp_path / "refused", family="sd15")
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_sd15_checkpoint_without_a_vae_takes_vae(sources, tmp_path):
    folder, _, bare = sources("sd15")
    manifest = _export(bare, folder, tmp_path / "engine", family="sd15", vae=str(folder / "vae"))
    assert manifest["source"]["vae"] == str((folder / "vae").absolute())
    _same_image_as_the_folder("single-file-sd15-vae", tmp_path / "engine", folder)


@pytest.mark.slow
def test_sdxl_checkpoint_with_its_vae_exports_the_folder_s_model(sources, tmp_path):
    folder, checkpoint, _ = sources("sdxl")
    manifest = _export(checkpoint, folder, tmp_path / "engine")
    assert manifest["family"] == "sdxl"
    assert set(manifest["components"]) >= {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    _same_image_as_the_folder("single-file-sdxl", tmp_path / "engine", folder)


@pytest.mark.slow
def test_sdxl_checkpoint_without_a_vae_takes_vae(sources, tmp_path):
    folder, _, bare = sources("sdxl")
    _export(bare, folder, tmp_path / "engine", family="sdxl", vae=str(folder / "vae"))
    _same_image_as_the_folder("single-file-sdxl-vae", tmp_path / "engine", folder)


def test_key_maps_cover_every_tensor(sources):
    """Every diffusers tensor has one original name, and no two share one (a map that dropped or merged keys would
    leave weights at their random init, which only the image comparison would otherwise catch)."""
    from diffusers import DiffusionPipeline

    for family in ("sd15", "sdxl"):
        pipe = DiffusionPipeline.from_pretrained(sources(family)[0])
        for mapped, module in ((unet_keys(pipe.unet), pipe.unet), (vae_keys(pipe.vae), pipe.vae)):
            assert set(mapped) == set(module.state_dict())
            assert len(set(mapped.values())) == len(mapped)
