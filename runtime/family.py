"""Which Stable Diffusion family a pipeline folder holds, read from its configs (no diffusers import).

Used by the exporter (on the pipeline's config dicts) and by the runtime (on folders exported by
optimum, which carry no manifest). Rules follow ../shared/reference/ort_optimum.md §4 (checklist).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sdrt.runtime.errors import UserError


class Family(str, Enum):
    SD15 = "sd15"
    SD21 = "sd21"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    SD3 = "sd3"  # Stable Diffusion 3 / 3.5: an MMDiT transformer over flow matching
    FLUX = "flux"  # FLUX.1 schnell / dev: a transformer over packed latents, flow matching, no CFG batch


SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    "StableDiffusionUpscalePipeline", "StableDiffusionDepth2ImgPipeline", "StableUnCLIPImg2ImgPipeline",
    "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline",  # LCM-distilled SD 1.5 (LCM Dreamshaper)
    "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
    "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
)
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
SUPPORTED_TEXT = ("SD 1.x, SD 2.x, SDXL base, SDXL refiner, their inpainting variants, SD 2 depth-to-image, SD 2.1 "
                  "unCLIP image variations, the SD ×4 upscaler, SD 3 / 3.5 and FLUX.1 schnell/dev")
UPSCALER = "StableDiffusionUpscalePipeline"
DEPTH = "StableDiffusionDepth2ImgPipeline"
UNCLIP = "StableUnCLIPImg2ImgPipeline"


@dataclass(frozen=True)
class Layout:
    """A family's description: which components the runtime calls and how (DESIGN.md §4a: new families arrive as a
    description, sampler entries and contributors, not as branches in the loop)."""

    denoiser: str = "unet"  # the component the step loop calls
    latent_input: str = "sample"  # its latent input and its output
    output: str = "out_sample"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # in encoding order, each with its tokenizer folder
    tokenizers: tuple[str, ...] = ("tokenizer",)
    vae_shift: bool = False  # the pipeline decodes latents / scaling_factor + shift_factor (SD3, Flux)
    plain_prompts_only: bool = False  # diffusers' own encoding only (no a1111/compel syntax, clip skip, embeddings)
    # with plain_prompts_only: the syntaxes its text conditioning runs besides plain, the first the default
    # (FLUX.1: runtime/prompts/flux_a1111.py, flux_compel.py); others run as plain (a1111) or are refused (compel)
    flow_syntaxes: tuple[str, ...] = ()
    guidance_batch: bool = True  # False: no classifier-free guidance batch (FLUX.1: guidance is an input or none)


SD_LAYOUT = Layout()
SDXL_LAYOUT = Layout(text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"))
SD3_LAYOUT = Layout(denoiser="transformer", latent_input="hidden_states", output="out_hidden_states",
                    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"), vae_shift=True, plain_prompts_only=True)
# FLUX.1: CLIP (pooled) and T5 (sequence); latents packed 2×2 around the transformer (runtime/denoiser/flux.py)
FLUX_LAYOUT = Layout(denoiser="transformer", latent_input="hidden_states", output="out_hidden_states",
                     text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
                     vae_shift=True, plain_prompts_only=True, flow_syntaxes=("a1111", "compel"),
                     guidance_batch=False)
LAYOUTS = {Family.SDXL: SDXL_LAYOUT, Family.SDXL_REFINER: SDXL_LAYOUT, Family.SD3: SD3_LAYOUT,
           Family.FLUX: FLUX_LAYOUT}


def denoiser_folder(model_index: dict) -> str:
    """The folder holding the denoiser's config: transformer for the transformer families, else unet."""
    return "transformer" if model_index.get("transformer") else "unet"


class UnsupportedModel(UserError):
    """The folder or checkpoint is not a pipeline sdrt can export or run."""


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    inpaint: bool  # a 9-channel UNet (latents ‖ mask ‖ masked-image latents)
    prediction_type: str  # epsilon | v_prediction | sample
    pipeline_class: str

    @property
    def layout(self) -> Layout:
        return LAYOUTS.get(self.family, SD_LAYOUT)

    @property
    def upscaler(self) -> bool:
        """The ×4 upscaler: a 7-channel UNet (latents ‖ noised low-resolution image) with a noise-level class label."""
        return self.pipeline_class == UPSCALER

    @property
    def depth(self) -> bool:
        """Depth-to-image: a 5-channel UNet (latents ‖ depth) and a DPT depth estimator."""
        return self.pipeline_class == DEPTH

    @property
    def unclip(self) -> bool:
        """unCLIP image variations: a CLIP image encoder whose noised embedding is the UNet's class label."""
        return self.pipeline_class == UNCLIP


def detect(model_index: dict, unet_config: dict, scheduler_config: dict) -> ModelInfo:
    """Family from model_index.json, unet/config.json (transformer/config.json for SD3) and
    scheduler/scheduler_config.json."""
    cls = model_index.get("_class_name", "")
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModel(f"pipeline class {cls or '(none)'} is not supported; sdrt supports {SUPPORTED_TEXT}")
    if cls in SD3_PIPELINES:  # one transformer folder runs text to image, image to image and inpainting
        return ModelInfo(family=Family.SD3, inpaint=False, prediction_type="flow", pipeline_class=cls)
    if cls in FLUX_PIPELINES:
        return ModelInfo(family=Family.FLUX, inpaint=False, prediction_type="flow", pipeline_class=cls)
    if unet_config.get("addition_embed_type") == "text_time":
        text_encoder = model_index.get("text_encoder")
        has_first_encoder = bool(text_encoder) and text_encoder[0] is not None
        refiner = model_index.get("requires_aesthetics_score", False) or not has_first_encoder
        family = Family.SDXL_REFINER if refiner else Family.SDXL
    elif unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        family = Family.SD21  # SD 2.x: OpenCLIP-H context (1024) and linear projections in the transformers
    else:
        family = Family.SD15
    return ModelInfo(
        family=family,
        inpaint=unet_config.get("in_channels", 4) == 9,
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        pipeline_class=cls,
    )
