"""One export descriptor per component: I/O names, dynamic axes, sample inputs, the module to trace.

Names and dims follow optimum's ONNX layout (../shared/reference/ort_optimum.md §4) so that folders
are interchangeable with `optimum-cli export onnx`. Differences, both deliberate: every text encoder also
exports `hidden_states.0..L` (SD 2.x clip-skip and SDXL's penultimate layer need them), and the UNet's
`timestep` stays float32 in fp16 exports (diffusers computes the timestep embedding in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "text_encoder_embeds",
                   "text_encoder_2_embeds", "vae_decoder_tiny", "vae_encoder_tiny",
                   "unet_deepcache", "unet_deepcache_shallow", "depth_estimator", "image_encoder",
                   "text_encoder_3", "transformer")  # the last two: SD3/3.5 (export/flow_components.py)
EMBEDS = "_embeds"  # text_encoder[_2]_embeds: the same encoder taking token vectors (textual inversion); opt-in
SEQUENCE_LENGTH = 77


@dataclass(frozen=True)
class Shape:
    """One trace/gate shape: batch and latent height/width."""

    batch: int
    latent_height: int
    latent_width: int


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict
    make_module: Callable[[object], torch.nn.Module]  # pipeline → module whose forward takes the inputs
    make_inputs: Callable[[object, Shape, torch.dtype], tuple]  # pipeline, shape, dtype → sample inputs
    float_inputs_fp32: tuple[str, ...] = ()  # float inputs kept fp32 in an fp16 export
    owner: Callable[[object], torch.nn.Module] | None = None  # the module whose weights it exports (default: by name)


class _TextEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):  # [B, 77] int64
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return (out.last_hidden_state, pooled, *out.hidden_states)


class _Given(torch.nn.Module):
    """Stands in for the token-embedding table while an `inputs_embeds` graph is traced: returns the vectors given."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, input_ids):
        return self.value


class _TextEncoderEmbeds(torch.nn.Module):
    """The text encoder from its token vectors on: inputs_embeds [B, 77, D] are the rows the runtime looked up in
    the token table (text_weights.npz) or took from an embedding file; input_ids [B, 77] still choose the pooled
    position (the first EOS, or the largest id on configs that say eos_token_id 2), as in transformers."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, inputs_embeds):
        embeddings = getattr(self.encoder, "text_model", self.encoder).embeddings
        table = embeddings.token_embedding
        embeddings.token_embedding = _Given(inputs_embeds)
        try:
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        finally:
            embeddings.token_embedding = table
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return (out.last_hidden_state, pooled, *out.hidden_states)


def split_added_cond(rest, added: bool) -> tuple[dict | None, list]:
    """A UNet wrapper's inputs after encoder_hidden_states: SDXL's text_embeds and time_ids come first when the UNet
    takes them → (added_cond_kwargs or None, the inputs after them)."""
    if not added:
        return None, list(rest)
    text_embeds, time_ids, *rest = rest
    return {"text_embeds": text_embeds, "time_ids": time_ids}, rest


class _UNet(torch.nn.Module):
    """sample, timestep, encoder_hidden_states, then SDXL's text_embeds and time_ids, then LCM's timestep_cond
    [B, time_cond_proj_dim] (the guidance-scale embedding of LCM-distilled UNets) where the UNet takes them."""

    def __init__(self, unet, with_added_cond: bool, with_timestep_cond: bool = False):
        super().__init__()
        self.unet = unet
        self.with_added_cond = with_added_cond
        self.with_timestep_cond = with_timestep_cond

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, rest = split_added_cond(rest, self.with_added_cond)
        cond = rest[0] if self.with_timestep_cond else None
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=cond, added_cond_kwargs=added,
                         return_dict=False)[0]


def has_timestep_cond(pipe) -> bool:
    """An LCM-distilled UNet: its guidance scale enters as an embedding (diffusers' get_guidance_scale_embedding)."""
    return pipe.unet.config.get("time_cond_proj_dim") is not None


class _UNetClassLabels(torch.nn.Module):
    """UNets with class embeddings (the ×4 upscaler's noise level): class_labels int64 [B]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels, return_dict=False)[0]


def has_class_labels(pipe) -> bool:
    cfg = pipe.unet.config
    return cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # [B, 4, h, w] → [B, 3, h·f, w·f]; latents already / scaling_factor
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder  # only what is traced: export rewrites walk this module's children
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else torch.nn.Identity()  # SD3: none

    def forward(self, sample):  # [B, 3, H, W] → [B, 8, H/f, W/f]: mean ‖ logvar, not sampled
        return self.quant_conv(self.encoder(sample))


class _DepthEstimator(torch.nn.Module):
    def __init__(self, estimator):
        super().__init__()
        self.estimator = estimator

    def forward(self, pixel_values):  # [B, 3, S, S] (the image processor's fixed size) → predicted_depth [B, S', S']
        return self.estimator(pixel_values).predicted_depth


def depth_input_size(pipe) -> tuple[int, int]:
    """(height, width) the depth estimator's image processor resizes every image to."""
    size = pipe.feature_extractor.size  # a dict, transformers 5's SizeDict, or one int (older configs)
    if isinstance(size, int):
        return size, size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k)
    return int(get("height")), int(get("width"))


def _depth_spec() -> ComponentSpec:
    def make_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        return ((torch.rand(shape.batch, 3, *depth_input_size(pipe), generator=g) * 2 - 1).to(dtype),)

    axes = {"pixel_values": {0: "batch_size"}, "predicted_depth": {0: "batch_size"}}
    return ComponentSpec("depth_estimator", ("pixel_values",), ("predicted_depth",), axes,
                         lambda p: _DepthEstimator(p.depth_estimator), make_inputs)


class _ImageEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):  # [B, 3, S, S] (the CLIP image processor's crop) → image_embeds [B, D]
        return self.encoder(pixel_values).image_embeds


def _image_encoder_spec() -> ComponentSpec:
    def make_module(pipe):
        if hasattr(pipe.image_encoder, "set_attn_implementation"):
            pipe.image_encoder.set_attn_implementation("eager")  # as the text encoders (fp16 graphs)
        return _ImageEncoder(pipe.image_encoder)

    def make_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        crop = pipe.feature_extractor.crop_size
        get = crop.get if isinstance(crop, dict) else lambda k: getattr(crop, k)
        return ((torch.rand(shape.batch, 3, int(get("height")), int(get("width")), generator=g) * 2 - 1).to(dtype),)

    axes = {"pixel_values": {0: "batch_size"}, "image_embeds": {0: "batch_size"}}
    return ComponentSpec("image_encoder", ("pixel_values",), ("image_embeds",), axes, make_module, make_inputs)


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _text_spec(name: str) -> ComponentSpec:
    def make_module(pipe):
        encoder = getattr(pipe, name)
        encoder.set_attn_implementation("eager")  # the SDPA path traces fp32 casts into fp16 graphs
        return _TextEncoder(encoder)

    def make_inputs(pipe, shape: Shape, dtype):
        vocab = getattr(pipe, name).config.vocab_size
        g = torch.Generator().manual_seed(shape.batch)
        return (torch.randint(0, vocab, (shape.batch, SEQUENCE_LENGTH), generator=g),)

    return ComponentSpec(name, ("input_ids",), (), {}, make_module, make_inputs)


class _T5(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):  # [B, L] int64 → [B, L, D]; diffusers' SD3 and Flux pass no attention mask
        return self.encoder(input_ids, return_dict=False)[0]


def t5_length(shape: Shape) -> int:
    """The gate's two T5 sequence lengths (traced at the first): the graph must take any length."""
    return 24 if shape.batch == 1 else 40


def t5_spec(name: str) -> ComponentSpec:
    """A T5EncoderModel (SD3's text_encoder_3, FLUX.1's text_encoder_2): input_ids → last_hidden_state."""
    def make_module(pipe):
        encoder = getattr(pipe, name)
        if hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation("eager")
        return _T5(encoder)

    def make_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        ids = torch.randint(2, getattr(pipe, name).config.vocab_size, (shape.batch, t5_length(shape)), generator=g)
        ids[:, -3], ids[:, -2:] = 1, 0  # </s>, then padding, as the tokenizer lays a short prompt out
        return (ids,)

    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "last_hidden_state": {0: "batch_size", 1: "sequence_length"}}
    return ComponentSpec(name, ("input_ids",), ("last_hidden_state",), axes, make_module, make_inputs)


def _text_embeds_spec(name: str) -> ComponentSpec:
    """`<name>_embeds`: (input_ids, inputs_embeds) → the outputs of `name`."""
    base = _text_spec(name)

    def make_module(pipe):
        base.make_module(pipe)
        return _TextEncoderEmbeds(getattr(pipe, name))

    def make_inputs(pipe, shape: Shape, dtype):
        (ids,) = base.make_inputs(pipe, shape, dtype)
        table = getattr(getattr(pipe, name), "text_model", getattr(pipe, name)).embeddings.token_embedding.weight
        return ids, table.detach()[ids].to(dtype)

    return ComponentSpec(name + EMBEDS, ("input_ids", "inputs_embeds"), (), {}, make_module, make_inputs)


def text_output_names(pipe, name: str) -> tuple[str, ...]:
    name = name.removesuffix(EMBEDS)
    layers = getattr(pipe, name).config.num_hidden_layers
    # CLIP with projection (SDXL's second encoder, both of SD3's) pools into text_embeds
    pooled = "text_embeds" if hasattr(getattr(pipe, name), "text_projection") else "pooler_output"
    return ("last_hidden_state", pooled) + tuple(f"hidden_states.{i}" for i in range(layers + 1))


def _unet_spec(with_added_cond: bool, class_labels: bool = False, timestep_cond: bool = False) -> ComponentSpec:
    inputs = ("sample", "timestep", "encoder_hidden_states") + (("text_embeds", "time_ids") if with_added_cond else ())
    inputs += ("class_labels",) if class_labels else ()
    inputs += ("timestep_cond",) if timestep_cond else ()

    def make_module(pipe):
        return _UNetClassLabels(pipe.unet) if class_labels else _UNet(pipe.unet, with_added_cond, timestep_cond)

    def make_inputs(pipe, shape: Shape, dtype):
        cfg = pipe.unet.config
        g = torch.Generator().manual_seed(shape.batch * 1000 + shape.latent_height)
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        args = [
            torch.randn(b, cfg.in_channels, h, w, generator=g).to(dtype),
            torch.tensor(float(torch.randint(0, 1000, (1,), generator=g))),  # rank-0 float32
            torch.randn(b, SEQUENCE_LENGTH, cfg.cross_attention_dim, generator=g).to(dtype),
        ]
        if with_added_cond:
            text_dim = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim * _time_ids(pipe)
            pixel = float(h * vae_scale_factor(pipe))
            ids = [pixel, pixel, 0.0, 0.0] + ([6.0] if _time_ids(pipe) == 5 else [pixel, pixel])
            args += [torch.randn(b, text_dim, generator=g).to(dtype), torch.tensor([ids] * b).to(dtype)]
        if class_labels and cfg.class_embed_type == "projection":  # unCLIP: [image embedding ‖ noise level], float
            args.append(torch.randn(b, cfg.projection_class_embeddings_input_dim, generator=g).to(dtype))
        elif class_labels:  # the ×4 upscaler's noise levels, int64 [B]
            args.append(torch.randint(0, cfg.num_class_embeds or 1000, (b,), generator=g))
        if timestep_cond:
            args.append(torch.randn(b, cfg.time_cond_proj_dim, generator=g).to(dtype))
        return tuple(args)

    axes = {
        "sample": {0: "batch_size", 2: "height", 3: "width"},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "out_sample": {0: "batch_size", 2: "height", 3: "width"},
    }
    if with_added_cond:
        axes |= {"text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"}}
    if class_labels:
        axes |= {"class_labels": {0: "batch_size"}}
    if timestep_cond:
        axes |= {"timestep_cond": {0: "batch_size"}}
    return ComponentSpec("unet", inputs, ("out_sample",), axes, make_module, make_inputs, ("timestep",))


def _time_ids(pipe) -> int:
    """SDXL base conditions on 6 time ids, the refiner on 5 (aesthetic score instead of target size)."""
    return 5 if pipe.config.get("requires_aesthetics_score", False) else 6


def _vae_decoder_spec() -> ComponentSpec:
    def make_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        channels = pipe.vae.config.latent_channels
        return (torch.randn(shape.batch, channels, shape.latent_height, shape.latent_width, generator=g).to(dtype),)

    axes = {
        "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
        "sample": {0: "batch_size", 2: "height", 3: "width"},
    }
    return ComponentSpec("vae_decoder", ("latent_sample",), ("sample",), axes, lambda p: _VaeDecoder(p.vae), make_inputs)


def _vae_encoder_spec() -> ComponentSpec:
    def make_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        f = vae_scale_factor(pipe)
        h, w = shape.latent_height * f, shape.latent_width * f
        return ((torch.rand(shape.batch, 3, h, w, generator=g) * 2 - 1).to(dtype),)

    axes = {
        "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
        "latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
    }
    return ComponentSpec("vae_encoder", ("sample",), ("latent_parameters",), axes, lambda p: _VaeEncoder(p.vae), make_inputs)


def component_specs(pipe) -> dict[str, ComponentSpec]:
    """The components this pipeline has, in export order."""
    specs = {}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            outputs = text_output_names(pipe, name)
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                    "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}
            axes |= {o: {0: "batch_size"} | ({1: "sequence_length"} if o != outputs[1] else {}) for o in outputs}
            # the variant first: exporting `name` releases the module the variant is traced from
            for base in (_text_embeds_spec(name), _text_spec(name)):
                specs[base.name] = ComponentSpec(base.name, base.input_names, outputs,
                                                 {k: v for k, v in axes.items() if k != "inputs_embeds"
                                                  or base.name.endswith(EMBEDS)},
                                                 base.make_module, base.make_inputs)
    specs["unet"] = _unet_spec(with_added_cond=pipe.unet.config.addition_embed_type == "text_time",
                               class_labels=has_class_labels(pipe), timestep_cond=has_timestep_cond(pipe))
    specs["vae_decoder"] = _vae_decoder_spec()
    if getattr(pipe, "low_res_scheduler", None) is None:  # the ×4 upscaler never encodes an image
        specs["vae_encoder"] = _vae_encoder_spec()
    if getattr(pipe, "depth_estimator", None) is not None:
        specs["depth_estimator"] = _depth_spec()
    if getattr(pipe, "image_encoder", None) is not None and getattr(pipe, "image_normalizer", None) is not None:
        specs["image_encoder"] = _image_encoder_spec()  # unCLIP's (IP-Adapter encoders are not pipeline parts here)
    return specs


def gate_shapes(pipe, component: str) -> tuple[Shape, Shape]:
    """Two shapes for the parity gate: batch 1 and batch 2, non-square, small enough for a CPU. The first is
    also the one traced.

    The UNet's first shape is not a multiple of its down/up-sampling factor m (2m - 1 × 2m + 1), so that
    diffusers' forward passes each up-sampler its skip connection's size and the traced graph takes any latent
    size (export/rewrites.py); the gate then checks that graph both there (sides 2n - 1 at some up-samplers,
    2n at others) and at a multiple (3m × 2m, every up-sampler doubling). The VAE takes any latent size,
    and small ones keep its fp16 gate fast (ONNX Runtime's CPU provider runs fp16 convolutions slowly).
    """
    if component.startswith("unet"):  # unet and the step-caching graphs (export/extras/deepcache.py)
        m = unet_factor(pipe)
        return Shape(1, 2 * m - 1, 2 * m + 1), Shape(2, 3 * m, 2 * m)
    return Shape(1, 8, 8), Shape(2, 12, 8)


def unet_factor(pipe) -> int:
    """The UNet's overall down-sampling factor: diffusers doubles at every block but the last."""
    return 2 ** (len(pipe.unet.config.block_out_channels) - 1)
