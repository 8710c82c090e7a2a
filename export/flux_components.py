"""Export descriptors of FLUX.1 (FluxPipeline: schnell and dev; ../shared/reference/flow_models.md §2, §4).

- text_encoder: CLIP-L without projection, as SD 1.x's (input_ids [B, 77] → last_hidden_state, pooler_output,
  hidden_states.0..L); Flux reads pooler_output only.
- text_encoder_2: T5EncoderModel, input_ids [B, L] → last_hidden_state [B, L, D] (diffusers' Flux passes no mask).
- transformer: FluxTransformer2DModel on packed latents: hidden_states [B, S, 4C] (S = (h/2)·(w/2)),
  encoder_hidden_states [B, L, D], pooled_projections [B, P], timestep [B] (σ: diffusers' t/1000), img_ids [S, 3],
  txt_ids [L, 3], and guidance [B] where the model embeds it (dev) → out_hidden_states [B, S, 4C]. Its qk-norm is
  torch.nn.RMSNorm, which the TorchScript exporter refuses: it goes through torch.onnx.export(dynamo=True) at
  opset 18 (export/onnx_export.py reads the module's `dynamic_shapes`). Batch, S and L are dynamic; the traced
  sample has batch 2 (torch.export specializes a dimension of size 1). timestep, guidance and the ids stay float32
  in fp16 exports (the module casts them as diffusers does).
- vae_decoder, vae_encoder: as every family's (export/components.py), 16 latent channels.
"""

from __future__ import annotations

import torch

from sdrt.runtime.denoiser.flux import image_ids  # diffusers' _prepare_latent_image_ids
from sdrt.runtime.family import FLUX_PIPELINES
from sdrt.export.components import (ComponentSpec, Shape, _text_spec, _vae_decoder_spec, _vae_encoder_spec,
                                    t5_length, t5_spec, text_output_names)

TRANSFORMER = "transformer"
T5 = "text_encoder_2"


def is_flux(pipe) -> bool:
    return type(pipe).__name__ in FLUX_PIPELINES


class _Transformer(torch.nn.Module):
    def __init__(self, transformer, guidance: bool):
        super().__init__()
        self.transformer = transformer
        self.guidance = guidance

    def dynamic_shapes(self) -> dict:
        """torch.export's dims for the dynamo exporter (export/onnx_export.py)."""
        batch, seq, txt = torch.export.Dim("batch_size"), torch.export.Dim("sequence"), torch.export.Dim("text_length")
        shapes = {"hidden_states": {0: batch, 1: seq}, "encoder_hidden_states": {0: batch, 1: txt},
                  "pooled_projections": {0: batch}, "timestep": {0: batch}, "img_ids": {0: seq}, "txt_ids": {0: txt}}
        return shapes | ({"guidance": {0: batch}} if self.guidance else {})

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def _transformer_spec(guidance: bool) -> ComponentSpec:
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids") + \
        (("guidance",) if guidance else ())

    def make_inputs(pipe, shape: Shape, dtype):
        cfg = pipe.transformer.config
        g = torch.Generator().manual_seed(shape.batch * 1000 + shape.latent_height)
        b, length = shape.batch, t5_length(shape)
        seq = (shape.latent_height // 2) * (shape.latent_width // 2)
        args = [torch.randn(b, seq, cfg.in_channels, generator=g).to(dtype),
                torch.randn(b, length, cfg.joint_attention_dim, generator=g).to(dtype),
                torch.randn(b, cfg.pooled_projection_dim, generator=g).to(dtype),
                torch.rand(b, generator=g),  # σ in (0, 1), float32
                image_ids(shape.latent_height, shape.latent_width), torch.zeros(length, 3)]
        return tuple(args + ([torch.full((b,), 3.5)] if guidance else []))

    axes = {"hidden_states": {0: "batch_size", 1: "sequence"},
            "encoder_hidden_states": {0: "batch_size", 1: "text_length"}, "pooled_projections": {0: "batch_size"},
            "timestep": {0: "batch_size"}, "img_ids": {0: "sequence"}, "txt_ids": {0: "text_length"},
            "out_hidden_states": {0: "batch_size", 1: "sequence"}} | ({"guidance": {0: "batch_size"}} if guidance else {})
    return ComponentSpec(TRANSFORMER, names, ("out_hidden_states",), axes,
                         lambda p: _Transformer(p.transformer, guidance), make_inputs,
                         ("timestep", "img_ids", "txt_ids", "guidance"))


def component_specs(pipe) -> dict[str, ComponentSpec]:
    """FLUX.1's components in export order: CLIP, T5, transformer, the VAE halves."""
    base = _text_spec("text_encoder")
    outputs = text_output_names(pipe, "text_encoder")
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
    axes |= {o: {0: "batch_size"} | ({1: "sequence_length"} if o != outputs[1] else {}) for o in outputs}
    return {"text_encoder": ComponentSpec("text_encoder", base.input_names, outputs, axes, base.make_module,
                                          base.make_inputs),
            T5: t5_spec(T5),
            TRANSFORMER: _transformer_spec(bool(pipe.transformer.config.guidance_embeds)),
            "vae_decoder": _vae_decoder_spec(), "vae_encoder": _vae_encoder_spec()}


def gate_shapes(pipe, component: str) -> tuple[Shape, Shape]:
    """Two shapes, the first traced: batch 2 first for the transformer (dynamo's dims must not be 1), latent sides
    even (2×2 packing), non-square."""
    if component == TRANSFORMER:
        return Shape(2, 8, 12), Shape(1, 12, 6)
    return Shape(1, 8, 8), Shape(2, 12, 8)


LATENT_MULTIPLE = 2  # packing takes 2×2 latent patches
