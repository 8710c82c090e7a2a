"""Export descriptors of the flow-matching transformer families: Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline).

Components and names follow optimum's ONNX layout for SD3 (../shared/reference/flow_models.md §2):
- text_encoder, text_encoder_2: CLIP with projection, as SDXL's encoders (input_ids → last_hidden_state,
  text_embeds, hidden_states.0..L; SD3 reads hidden_states[-2] and text_embeds);
- text_encoder_3: T5EncoderModel, input_ids [B, L] → last_hidden_state [B, L, D] (diffusers feeds no mask);
- transformer: SD3Transformer2DModel, (hidden_states [B, C, h, w], encoder_hidden_states [B, L, joint],
  pooled_projections [B, P], timestep [B] float32, kept float32 in fp16 exports) → out_hidden_states;
- vae_decoder, vae_encoder: as the other families, 16 latent channels (export/components.py).
Batch, latent height/width and the text sequence are dynamic; the gate checks two of each.
"""

from __future__ import annotations

import torch

from sdrt.export import flux_components as flux
from sdrt.runtime.family import SD3_PIPELINES
from sdrt.export.components import (ComponentSpec, Shape, _text_spec, _vae_decoder_spec, _vae_encoder_spec,
                                    t5_length, t5_spec, text_output_names)

TRANSFORMER = "transformer"
T5 = "text_encoder_3"
CLIP_SEQUENCE = 77


PIPELINE_CLASSES = SD3_PIPELINES


def is_flow(pipe) -> bool:
    """An SD3 / SD3.5 or FLUX.1 pipeline: a transformer denoiser. FLUX.1 has its own descriptors
    (export/flux_components.py), which this module's component_specs, gate_shapes and latent_multiple hand on."""
    return type(pipe).__name__ in PIPELINE_CLASSES or flux.is_flux(pipe)


def denoiser(pipe):
    """The module the step loop calls: the transformer (SD3, FLUX.1) or the UNet."""
    transformer = getattr(pipe, TRANSFORMER, None) if "transformer" in getattr(pipe, "config", {}) else None
    return transformer if transformer is not None else pipe.unet


class _Transformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


def _transformer_spec() -> ComponentSpec:
    def make_inputs(pipe, shape: Shape, dtype):
        cfg = pipe.transformer.config
        g = torch.Generator().manual_seed(shape.batch * 1000 + shape.latent_height)
        b = shape.batch
        sequence = CLIP_SEQUENCE + t5_length(shape)
        return (torch.randn(b, cfg.in_channels, shape.latent_height, shape.latent_width, generator=g).to(dtype),
                torch.randn(b, sequence, cfg.joint_attention_dim, generator=g).to(dtype),
                torch.randn(b, cfg.pooled_projection_dim, generator=g).to(dtype),
                (torch.rand(b, generator=g) * 1000).to(torch.float32))  # σ·1000, float32 [B]

    axes = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "pooled_projections": {0: "batch_size"},
            "timestep": {0: "batch_size"},
            "out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}}
    return ComponentSpec(TRANSFORMER, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                         ("out_hidden_states",), axes, lambda p: _Transformer(p.transformer), make_inputs,
                         ("timestep",))


def component_specs(pipe) -> dict[str, ComponentSpec]:
    """The components of a flow pipeline, in export order (text encoders, transformer, VAE halves)."""
    if flux.is_flux(pipe):  # FLUX.1: its own descriptors (export/flux_components.py)
        return flux.component_specs(pipe)
    specs = {}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            base = _text_spec(name)
            outputs = text_output_names(pipe, name)
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
            axes |= {o: {0: "batch_size"} | ({1: "sequence_length"} if o != outputs[1] else {}) for o in outputs}
            specs[name] = ComponentSpec(name, base.input_names, outputs, axes, base.make_module, base.make_inputs)
    if getattr(pipe, T5, None) is not None:
        specs[T5] = t5_spec(T5)
    specs[TRANSFORMER] = _transformer_spec()
    specs["vae_decoder"] = _vae_decoder_spec()  # as every family's (export/components.py), 16 channels
    specs["vae_encoder"] = _vae_encoder_spec()
    return specs


def gate_shapes(pipe, component: str) -> tuple[Shape, Shape]:
    """Batch 1 and batch 2, non-square; the transformer's latent sides multiples of its patch size (diffusers'
    SD3 pipeline requires sizes that are multiples of vae_scale_factor · patch_size)."""
    if flux.is_flux(pipe):
        return flux.gate_shapes(pipe, component)
    if component == TRANSFORMER:
        p = latent_multiple(pipe)
        return Shape(1, 4 * p, 6 * p), Shape(2, 6 * p, 4 * p)
    return Shape(1, 8, 8), Shape(2, 12, 8)


def latent_multiple(pipe) -> int:
    """Latent sides must be multiples of the transformer's patch size."""
    if flux.is_flux(pipe):
        return flux.LATENT_MULTIPLE
    return int(pipe.transformer.config.patch_size)


def manifest_record(pipe) -> dict:
    """The manifest's `transformer` record: how latents meet the transformer, the T5 length diffusers pads prompts
    to by default (runs may pass --max-sequence-length), and the schedule kind (reference/flow_models.md §2–3)."""
    sched = dict(pipe.scheduler.config)
    packed = flux.is_flux(pipe)
    return {"latent_packing": "2x2" if packed else "none",  # FLUX.1 packs [B,C,h,w] → [B,(h/2)(w/2),4C] outside
            "patch_size": 2 if packed else int(pipe.transformer.config.patch_size),
            "max_sequence_length": 512 if packed else 256,  # FluxPipeline / StableDiffusion3Pipeline defaults
            "schedule": {"kind": "flow_match", "shift": float(sched.get("shift", 1.0)),
                         "dynamic_shift": bool(sched.get("use_dynamic_shifting", False))},
            "guidance_embedding": bool(packed and pipe.transformer.config.guidance_embeds)}


def check_options(cfg) -> None:
    """The export options the transformer families do not take yet (an ExportConfig), refused by name."""
    from sdrt.runtime.errors import UserError

    given = [flag for flag, value in (("--hypernetwork", cfg.hypernetworks),
                                      ("--textual-inversion", cfg.textual_inversion),
                                      ("--deepcache", cfg.deepcache), ("--controlnet", cfg.controlnets),
                                      ("--ip-adapter", cfg.ip_adapter), ("--t2i-adapter", cfg.t2i_adapters)) if value]
    if given:
        raise UserError(f"SD3 / SD3.5 and FLUX.1 exports take no {', '.join(given)} yet; export the model without them")
    unknown = [c for c in cfg.components or () if c in ("unet",) or c.startswith(("unet_", "text_encoder_embeds",
                                                                                   "text_encoder_2_embeds"))]
    if unknown:
        raise UserError(f"SD3 / SD3.5 pipelines have no {', '.join(unknown)}; their components are text_encoder, "
                        "text_encoder_2, text_encoder_3, transformer, vae_decoder and vae_encoder")
