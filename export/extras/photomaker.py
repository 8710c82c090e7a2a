"""PhotoMaker v1 and v2 at export (reference/identity.md §2): `sdrt export MODEL --photomaker FILE`, FILE as
TencentARC ships it: `photomaker-v1.bin` / `photomaker-v2.bin` = {"id_encoder": state dict, "lora_weights": state
dict}, or a .safetensors holding the same tensors under `id_encoder.` / `lora_weights.` prefixes (what photomakerv's
load_photomaker_adapter reads).

What the directory gains:
- `photomaker/id_encoder`: PhotoMaker's ID encoder up to the ID embeddings, id_pixel_values [N, 3, S, S] (the
  photos as CLIPImageProcessor() gives them, S = 224) → id_embeds [N, D]: CLIP ViT's post-layernormed class token
  through visual_projection (→ text_encoder's width) ‖ visual_projection_2 (→ text_encoder_2's width), D = the
  UNet's cross-attention width. Run once per identity (the runtime caches it by the photos' bytes); N dynamic;
- `photomaker/fuse`: the FuseModule on the K class-token rows, class_embeds [K, D] ‖ id_embeds [K, D] →
  fused_embeds [K, D] = LN(MLP2(MLP1([t ‖ e]) + t)) with MLP = LN → Linear → GELU → Linear (MLP2 residual). The
  runtime gathers the class rows and scatters the result back (PhotoMaker's masked_scatter), so K and the prompt's
  batch stay free;
- `photomaker/lora.safetensors`: the file's UNet LoRA as written (diffusers' old attention-processor keys
  `unet.<path>.processor.to_{q,k,v,out}_lora.{down,up}.weight`, no alphas: scale 1), applied at load to the
  requests that use PhotoMaker (runtime/lora/), so the plain UNet still serves every other request;
- `photomaker/preprocessor_config.json`: CLIPImageProcessor()'s defaults, which PhotoMaker's pipeline uses.
The CLIP tower's shape is read from the weights (layers, widths, patch and image size); its heads are width / 64
(PhotoMaker's ViT-L/14: 1024 / 64 = 16). A v2 file (`photomaker-v2.bin`: `qformer_perceiver.*` in its id_encoder)
gives an ID encoder that also takes each photo's ArcFace embedding, face_embeds [N, 512] (raw insightface
`embedding`), and gives T = 2 rows per photo, id_embeds [N, T, D] (export/extras/photomaker_v2.py).
SDXL only: PhotoMaker's weights exist for SDXL alone.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape
from sdrt.export.extras import photomaker_v2
from sdrt.export.load import sha256_of_file

NAME = "photomaker"
ID_ENCODER = "photomaker/id_encoder"
FUSE = "photomaker/fuse"
LORA_FILE = "photomaker/lora.safetensors"
PROCESSOR_FILE = "photomaker/preprocessor_config.json"
HEAD_WIDTH = 64  # CLIP ViT heads: PhotoMaker's tower is ViT-L/14 (1024 wide, 16 heads)
PARTS = ("id_encoder", "lora_weights")


@dataclass(frozen=True)
class PhotoMakerSource:
    given: str  # what --photomaker named
    path: str
    state: dict = field(default=None, compare=False, repr=False)  # {"id_encoder": …, "lora_weights": …}


def parse(text: str) -> PhotoMakerSource:
    """The file read and its layout checked before the model loads."""
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"--photomaker {text}: no such file (give TencentARC/PhotoMaker's photomaker-v1.bin or "
                        "photomaker-v2.bin)")
    return PhotoMakerSource(text, str(path), read(PhotoMakerSource(text, str(path))))


def check_family(family: str, src: PhotoMakerSource | None) -> None:
    if src is not None and family != "sdxl":
        raise UserError(f"--photomaker {src.given}: PhotoMaker is SDXL-only (its ID embeddings are SDXL's two text "
                        f"encoders' widths); this model is {family}")


def read(src: PhotoMakerSource) -> dict:
    """{"id_encoder": {…}, "lora_weights": {…}} from the .bin (a pickle of tensors, read with weights_only) or the
    prefixed .safetensors."""
    what = f"--photomaker {src.given}"
    try:
        if src.path.endswith(".safetensors"):
            from safetensors.torch import load_file

            flat = load_file(src.path)
            state = {p: {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")} for p in PARTS}
            if not all(state.values()):
                raise UserError(f"{what}: no id_encoder.* and lora_weights.* tensors; this is not a PhotoMaker file")
        else:
            state = torch.load(src.path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # safetensors/torch raise their own errors on damaged or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: cannot read ({first[:200]})") from None
    if not isinstance(state, dict) or sorted(state) != sorted(PARTS) or \
            not all(isinstance(state[p], dict) for p in PARTS):
        keys = ", ".join(map(str, list(state)[:4])) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{what}: not a PhotoMaker file (it holds {keys}; PhotoMaker's holds id_encoder and "
                        "lora_weights)")
    return state


def version(id_state: dict) -> str:
    """v2 adds the QFormerPerceiver over the ArcFace embedding (model_v2.py); v1 has CLIP and the fuse alone."""
    return "v2" if any(k.startswith("qformer_perceiver.") for k in id_state) else "v1"


class _Mlp(torch.nn.Module):
    def __init__(self, width_in: int, width_out: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm = torch.nn.LayerNorm(width_in)
        self.fc1 = torch.nn.Linear(width_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, width_out)
        self.residual = residual

    def forward(self, x):
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class Fuse(torch.nn.Module):
    """PhotoMaker's FuseModule on gathered rows: t (class token rows) and e (ID rows), both [K, D]."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp1 = _Mlp(2 * width, width, width, residual=False)
        self.mlp2 = _Mlp(width, width, width, residual=True)
        self.layer_norm = torch.nn.LayerNorm(width)

    def forward(self, class_embeds, id_embeds):
        x = self.mlp1(torch.cat([class_embeds, id_embeds], dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(x))


class IdEncoder(torch.nn.Module):
    """CLIP ViT + visual_projection ‖ visual_projection_2 (PhotoMakerIDEncoder's forward up to the fuse)."""

    def __init__(self, clip, projection_2):
        super().__init__()
        self.clip = clip  # CLIPVisionModelWithProjection: vision_model, visual_projection
        self.visual_projection_2 = projection_2

    def forward(self, id_pixel_values):
        shared = self.clip.vision_model(id_pixel_values)[1]  # post-layernormed class token
        return torch.cat([self.clip.visual_projection(shared), self.visual_projection_2(shared)], dim=-1)


def _vision_config(state: dict, what: str):
    from transformers import CLIPVisionConfig

    try:
        width, _, patch, _ = state["vision_model.embeddings.patch_embedding.weight"].shape
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
        hidden = state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = state["visual_projection.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
        raise UserError(f"{what}: its id_encoder is not PhotoMaker's (a CLIP vision tower with visual_projection "
                        "and visual_projection_2 was expected)") from None
    side = round((positions - 1) ** 0.5)
    return CLIPVisionConfig(hidden_size=width, intermediate_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // HEAD_WIDTH), patch_size=patch,
                            image_size=side * patch, projection_dim=projection)


def load(pipe, src: PhotoMakerSource) -> dict:
    """The ID encoder and fuse modules (fp32), the LoRA's tensors, checked against this pipeline; returns
    {"encoder", "fuse", "lora", "record"}."""
    from transformers import CLIPVisionModelWithProjection

    what = f"--photomaker {src.given}"
    state = src.state if src.state is not None else parse(src.given).state
    ids = state["id_encoder"]
    config = _vision_config(ids, what)
    clip = CLIPVisionModelWithProjection(config)
    v2 = version(ids) == "v2"
    try:
        projection_2 = torch.nn.Linear(config.hidden_size, ids["visual_projection_2.weight"].shape[0], bias=False)
        fuse = Fuse(ids["fuse_module.layer_norm.weight"].shape[0])
        tower = ("vision_model.", "visual_projection.")  # not the position_ids buffer older transformers saved
        clip.load_state_dict({k: v.float() for k, v in ids.items() if k.startswith(tower) and "position_ids" not in k})
        projection_2.load_state_dict({"weight": ids["visual_projection_2.weight"].float()})
        fuse.load_state_dict({k[len("fuse_module."):]: v.float() for k, v in ids.items()
                              if k.startswith("fuse_module.")})
    except (KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{what}: its id_encoder does not have PhotoMaker {'v2' if v2 else 'v1'}'s layout ({first})") \
            from None
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    cross = int(pipe.unet.config.cross_attention_dim)
    got = [config.projection_dim, projection_2.out_features]
    if got != widths or fuse.layer_norm.normalized_shape[0] != cross:
        raise UserError(f"{what}: its ID embeddings are {got[0]} + {got[1]} wide for a {sum(got)}-wide UNet; this "
                        f"model's text encoders are {widths[0]} + {widths[1]} (cross-attention {cross})")
    encoder = photomaker_v2.build(clip, ids, what) if v2 else IdEncoder(clip, projection_2).eval()
    if v2 and encoder.qformer_perceiver.dim != cross:
        raise UserError(f"{what}: its v2 ID embeddings are {encoder.qformer_perceiver.dim} wide; this model's "
                        f"cross-attention is {cross}")
    lora = {k: (v.float() if v.dtype == torch.bfloat16 else v).contiguous() for k, v in state["lora_weights"].items()}
    _check_lora(pipe, lora, what)
    record = {"source": src.path, "sha256": sha256_of_file(Path(src.path)), "version": "v2" if v2 else "v1",
              "id_encoder": ID_ENCODER, "fuse": FUSE, "lora": LORA_FILE, "processor": PROCESSOR_FILE,
              "image_size": config.image_size, "id_width": cross}
    if v2:  # per photo: T ID rows from its ArcFace embedding [face_width] (raw insightface `embedding`)
        q = encoder.qformer_perceiver
        record |= {"tokens": q.tokens, "face_width": q.token_proj[0].in_features}
    return {"encoder": encoder, "fuse": fuse.eval(), "lora": lora, "record": record}


def _check_lora(pipe, lora: dict, what: str) -> None:
    """Every key of the LoRA names a module of this UNet (sdrt's matcher, the one the runtime applies it with)."""
    from safetensors.torch import save_file

    from sdrt.runtime.lora import files as lora_files, fuse as lora_fuse

    model = lora_fuse.model_from_modules({"unet": pipe.unet}, dict(pipe.unet.config), "sdxl")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "lora.safetensors"
        save_file(lora, str(path))
        try:
            lora_files.match(lora_files.read_header(path), model)
        except lora_files.LoraError as e:
            raise UserError(f"{what}: its lora_weights do not fit this UNet ({e})") from None


def _spec(name: str, inputs: tuple, output: str, module, make_inputs) -> ComponentSpec:
    axes = {n: {0: "rows"} for n in (*inputs, output)}
    return ComponentSpec(name, inputs, (output,), axes, lambda p: module, make_inputs, owner=lambda p: module)


def specs(loaded: dict) -> dict:
    """{component: (spec, config.json content, key digest)} for the ID encoder and the fuse module."""
    record, digest = loaded["record"], "|pm:" + loaded["record"]["sha256"]
    side, width = record["image_size"], record["id_width"]

    def pixels(p, shape: Shape, dtype):  # N = batch + 1: two and three photos (no size-1 axis at trace time)
        g = torch.Generator().manual_seed(shape.batch * 11 + 3)
        x = torch.randn(shape.batch + 1, 3, side, side, generator=g).to(dtype)
        v2 = "face_width" in record  # and their ArcFace embeddings, raw (norm ≈ 20 rather than 1)
        return (x, (torch.randn(shape.batch + 1, record["face_width"], generator=g) * 0.9).to(dtype)) if v2 else (x,)

    def rows(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 13 + 5)
        return tuple(torch.randn(shape.batch + 1, width, generator=g).to(dtype) for _ in range(2))

    config = {k: v for k, v in record.items() if k in ("version", "image_size", "id_width", "tokens", "face_width")}
    inputs = ("id_pixel_values", "face_embeds") if "face_width" in record else ("id_pixel_values",)
    return {ID_ENCODER: (_spec(ID_ENCODER, inputs, "id_embeds", loaded["encoder"], pixels), config, digest),
            FUSE: (_spec(FUSE, ("class_embeds", "id_embeds"), "fused_embeds", loaded["fuse"], rows), config, digest)}


def write_files(tmp: Path, loaded: dict) -> None:
    """The LoRA and the photos' preprocessing beside the two graphs."""
    from safetensors.torch import save_file

    (tmp / NAME).mkdir(parents=True, exist_ok=True)
    save_file(loaded["lora"], str(tmp / LORA_FILE), metadata={"source": "PhotoMaker lora_weights"})
    side = loaded["record"]["image_size"]
    processor = {"do_resize": True, "size": {"shortest_edge": side}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": side, "width": side}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}
    (tmp / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2))  # CLIPImageProcessor()'s defaults
