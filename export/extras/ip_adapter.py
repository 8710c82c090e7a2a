"""IP-Adapter at export (reference/customization.md §7): the CLIP image encoder as `image_encoder/model.onnx` and
`unet_ip/model.onnx`, the UNet with the adapters loaded (diffusers' load_ip_adapter, one or several sharing the one
image encoder) taking each adapter's image embeddings and scale as inputs. Plain runs keep the plain UNet graph.

InstantID's adapter (kind "instantid", export/extras/instantid.py) joins the same graphs with its Resampler taken out
(exported as its own graph): its ip_image_embeds_K are the projected face tokens [B, 1, 16, D] the runtime caches.

image_encoder: pixel_values [B,3,S,S] (CLIPImageProcessor output) → image_embeds [B,D] (CLIPVisionModelWithProjection's
projection; plain adapters) and penultimate_hidden_states [B,T,W] (hidden_states[-2]; "plus" and "full" adapters);
absent when every adapter is FaceID, whose embeddings ([B, faces, D], e.g. insightface's) the caller gives.
unet_ip: the UNet's inputs + ip_image_embeds_K ([B, images, D] plain/faceid, [B, images, T, W] plus/full) for adapter K
in the manifest's order, then ip_scale_K (rank 0, fp32) → out_sample. The scales are graph inputs: every
IPAdapterAttnProcessor2_0 gets them as tensors while tracing (diffusers keeps Python floats, which a trace would bake
in); hidden += scale_K · attention(ip_K) is then the graph's own multiply, and scale 0 adds exact zeros where
diffusers skips the branch (so an adapter a request does not use is fed scale 0).

With InstantID's adapter, unet_controlnet_ip also takes `ip_mask` [B, 1, h, w] (latent size): InstantID's "enhance
non-face region" (runtime/conditioning/instantid.py), the face-box mask on InstantID's branch only. Each attn2 at
UNet level k (latent ÷ 2^k) multiplies that branch by ip_mask[:, :, ::2^k, ::2^k] flattened to its tokens — PyTorch's
nearest resize by an integer factor, as InstantID's IPAttnProcessor2_0 region control does
(ip_adapter/attention_processor.py: F.interpolate(region_mask, scale_factor=1/ratio, mode="nearest") over the
output-size mask, then ip · mask before hidden += scale · ip). A mask of ones leaves the graph's output unchanged.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape, _unet_spec, split_added_cond
from sdrt.export.load import sha256_of_files

IMAGE_ENCODER = "image_encoder"
UNET_IP = "unet_ip"
UNET_CONTROLNET_IP = "unet_controlnet_ip"  # both: ControlNet residual inputs and the image prompt
IP_MASK = "ip_mask"  # InstantID's region mask on its adapter's branch (unet_controlnet_ip with InstantID only)
MASK_KEY = "|iid-mask"  # in unet_controlnet_ip's key with InstantID: a re-export does not reuse a graph without it


@dataclass(frozen=True)
class IpAdapterSource:
    adapters: tuple[tuple[str, str], ...]  # (file, name) in graph order; files in diffusers' IP-Adapter format
    image_encoder: str | None  # CLIPVisionModelWithProjection folder, shared by every adapter (as in diffusers)
    external: tuple[str, ...] = ()  # adapters (by name) whose projection is its own graph: InstantID's

    @property
    def adapter(self) -> str:
        return self.adapters[0][0]


def parse_sources(given, image_encoder: str | None) -> IpAdapterSource:
    """`--ip-adapter SRC[=NAME]` (repeatable) → IpAdapterSource; NAME defaults to the file's stem."""
    from sdrt.export.extras.controlnet import NAME_PATTERN

    adapters = []
    for text in (given,) if isinstance(given, str) else tuple(given):
        src, _, name = text.rpartition("=")
        if not src or not name or "/" in name:
            src, name = text, ""
        name = name or Path(src).stem
        if not NAME_PATTERN.match(name):
            raise UserError(f"--ip-adapter {text}: the name {name!r} must be letters, digits, '_', '.' or '-' "
                            "(give one with SRC=NAME)")
        adapters.append((src, name))
    names = [n for _, n in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"--ip-adapter: two adapters are named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                        "name them with SRC=NAME")
    return IpAdapterSource(tuple(adapters), image_encoder)


def source_of(given, image_encoder: str | None, located, instantid: tuple[str, str] | None = None):
    """--ip-adapter (repeatable), --image-encoder and InstantID's (adapter file, name) → the checked IpAdapterSource,
    or None when none is given; `located` makes local paths absolute."""
    if not given and image_encoder is None and instantid is None:
        return None
    if not given and instantid is None:
        raise UserError("--image-encoder is the IP-Adapter's image encoder; give --ip-adapter FILE with it")
    src = parse_sources(given or (), image_encoder)
    src = IpAdapterSource(tuple((located(f), n) for f, n in src.adapters) + ((instantid,) if instantid else ()),
                          src.image_encoder, (instantid[1],) if instantid else ())
    check_source(src)
    return src


def check_source(src: IpAdapterSource) -> None:
    """Before the model loads: every file there, and an image encoder given unless every adapter is FaceID."""
    for adapter, _ in src.adapters:
        if not Path(adapter).expanduser().is_file():
            raise UserError(f"--ip-adapter {adapter}: no such file (give the adapter's .safetensors or .bin)")
    if src.image_encoder is None:
        for adapter, name in src.adapters:
            if name not in src.external and kind(_read_adapter(adapter)["image_proj"]) != "faceid":
                raise UserError(f"--ip-adapter {adapter} needs --image-encoder: the CLIP vision model (a diffusers/"
                                "transformers folder) the adapter was trained with")
        return
    enc = Path(src.image_encoder).expanduser()
    if not (enc / "config.json").is_file():
        raise UserError(f"--image-encoder {src.image_encoder}: not a CLIPVisionModelWithProjection folder "
                        "(no config.json)")


def kind(state_dict_keys) -> str:
    """From the image_proj keys, as diffusers' _convert_ip_adapter_image_proj_to_diffusers tells them apart:
    plain (ImageProjection: proj.weight), full (IP-Adapter Full Face, IPAdapterFullImageProjection: proj.0/proj.3)
    or plus (Resampler: latents; IP-Adapter Plus and Plus Face share it). plain takes the encoder's image_embeds,
    full and plus its penultimate hidden states."""
    keys = list(state_dict_keys)
    if "proj.weight" in keys:
        return "plain"
    if "proj.3.weight" in keys and "perceiver_resampler.proj_in.weight" not in keys:
        return "full"
    if "perceiver_resampler.proj_in.weight" in keys:
        raise UserError("this is an IP-Adapter FaceID Plus (perceiver_resampler): its projection takes face embeddings "
                        "and CLIP hidden states together, which sdrt does not export; IP-Adapter, Plus, Plus Face, "
                        "Full Face and FaceID are exported")
    if "norm.weight" in keys and "proj.0.weight" in keys:
        return "faceid"
    if "latents" in keys:
        return "plus"
    raise UserError("this IP-Adapter's image projection is not IP-Adapter (proj.weight), Full Face (proj.3.weight), "
                    "FaceID (proj.0.weight, norm.weight) or Plus / Plus Face (latents); sdrt exports those")


def uses_hidden_states(adapter_kind: str) -> bool:
    """diffusers' prepare_ip_adapter_image_embeds: every projection but ImageProjection takes hidden_states[-2]
    (FaceID takes the caller's face embeddings, ip_adapter_image_embeds, instead of an image)."""
    return adapter_kind in ("plus", "full")


def load(pipe, src: IpAdapterSource) -> dict:
    """Load the image encoder and the adapters (into a copy of the UNet: the plain UNet stays as it is).
    Returns {"unet": adapted UNet, "encoder": CLIPVisionModelWithProjection, "processor": CLIPImageProcessor config,
    "record": manifest entry {image_encoder, adapters: [{name, source, sha256, kind, embed_dim}]}}."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = None
    if src.image_encoder is not None:
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(Path(src.image_encoder).expanduser(),
                                                                    torch_dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"--image-encoder {src.image_encoder}: cannot load ({str(e).splitlines()[0]})") from None
    states, records = [], []
    for source, name in src.adapters:
        state = _read_adapter(source)
        adapter_kind = kind(state["image_proj"])
        if name in src.external and adapter_kind != "plus":
            raise UserError(f"{source}: InstantID's ip-adapter holds a Resampler (image_proj.latents, proj_in, …); "
                            f"this one's image projection is an IP-Adapter {adapter_kind}")
        adapter_kind = "instantid" if name in src.external else adapter_kind
        embed_dim = state["image_proj"][{"plain": "proj.weight", "full": "proj.0.weight", "faceid": "proj.0.weight",
                                         "plus": "proj_in.weight", "instantid": "proj_in.weight"}[adapter_kind]].shape[-1]
        if encoder is not None and adapter_kind not in ("faceid", "instantid"):
            expected = encoder.config.projection_dim if adapter_kind == "plain" else encoder.config.hidden_size
            if embed_dim != expected:
                raise UserError(f"--ip-adapter {source} takes image embeddings of width {embed_dim}; the image "
                                f"encoder gives {expected}: give the image encoder the adapter was trained with")
        path = Path(source).expanduser()
        states.append(state)
        records.append({"name": name, "source": source, "sha256": sha256_of_files([path], path.parent),
                        "kind": adapter_kind, "embed_dim": int(embed_dim)})
        if adapter_kind == "instantid":  # the face tokens it is fed: [16 queries, the UNet's cross width]
            records[-1] |= {"tokens": int(state["image_proj"]["latents"].shape[1]),
                            "token_dim": int(state["image_proj"]["proj_out.weight"].shape[0])}
    unet = copy.deepcopy(pipe.unet)
    try:
        unet._load_ip_adapter_weights(states)  # several: MultiIPAdapterImageProjection, per-adapter to_k_ip/to_v_ip
        for state in states:
            _fuse_faceid_lora(unet, state["ip_adapter"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"--ip-adapter {src.adapter} does not fit this model's UNet ({str(e).splitlines()[0]}); "
                        "give an adapter made for this family") from None
    unet.eval()
    projections = {}
    for k, r in enumerate(records):  # InstantID: the Resampler becomes its own graph, the UNet takes its tokens
        if r["kind"] == "instantid":
            projections[r["name"]] = unet.encoder_hid_proj.image_projection_layers[k].eval()
            unet.encoder_hid_proj.image_projection_layers[k] = torch.nn.Identity()
    unet.encoder_hid_proj.lora_target = False  # the adapter's own layers: no LoRA patches them (export/weights_map)
    for p in unet.attn_processors.values():
        if isinstance(p, torch.nn.Module):
            p.lora_target = False
    processor = pipe.feature_extractor if getattr(pipe, "feature_extractor", None) is not None else \
        CLIPImageProcessor(size=encoder.config.image_size if encoder else 224,
                           crop_size=encoder.config.image_size if encoder else 224)  # load_ip_adapter's
    record = {"image_encoder": src.image_encoder, "adapters": records}
    return {"unet": unet, "encoder": encoder, "processor": processor.to_dict(), "record": record,
            "projections": projections}


def _fuse_faceid_lora(unet, ip_weights: dict) -> None:
    """IP-Adapter FaceID's own LoRA (`K.to_{q,k,v,out}_lora.{down,up}` for the K-th of attn_processors), which
    diffusers' load_ip_adapter loads through load_lora_weights at weight 1 (no alpha: scale 1): fused into this UNet
    copy as W += up · down (fp32), so it acts wherever the FaceID adapter is loaded, as in diffusers."""
    for key_id, name in enumerate(unet.attn_processors):
        if f"{key_id}.to_q_lora.down.weight" not in ip_weights:
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        with torch.no_grad():
            for proj, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
                up = ip_weights[f"{key_id}.to_{proj}_lora.up.weight"].float()
                down = ip_weights[f"{key_id}.to_{proj}_lora.down.weight"].float()
                linear.weight += (up @ down).to(linear.weight.dtype)


def signature(record: dict) -> str:
    """The export key's part for the adapters: their names and contents, in graph order."""
    return "|ip:" + ",".join(f"{a['name']}:{a['sha256']}" for a in record["adapters"])


def recorded_sources(record: dict) -> tuple[str, ...]:
    """A manifest's ip_adapter entry as `--ip-adapter SRC=NAME` arguments (a single-adapter entry written before
    several adapters existed has source/kind at its top level)."""
    adapters = record.get("adapters") or ([{"source": record["source"], "name": Path(record["source"]).stem}]
                                          if record.get("source") else [])
    return tuple(f"{a['source']}={a['name']}" for a in adapters if a.get("kind") != "instantid")  # --instantid's own


def _read_adapter(source: str) -> dict:
    """{"image_proj": {…}, "ip_adapter": {…}} from a .safetensors or .bin in diffusers' IP-Adapter format."""
    from diffusers.models.modeling_utils import load_state_dict

    adapter = Path(source).expanduser()
    try:
        if adapter.suffix == ".safetensors":
            from safetensors import safe_open

            state = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(adapter), framework="pt") as f:
                for key in f.keys():
                    head, _, rest = key.partition(".")
                    if head in state:
                        state[head][rest] = f.get_tensor(key)
        else:
            state = load_state_dict(str(adapter))
    except Exception as e:  # safetensors/torch raise their own errors on damaged files
        raise UserError(f"--ip-adapter {source}: cannot read ({str(e).splitlines()[0]})") from None
    if not state.get("image_proj") or not state.get("ip_adapter"):
        raise UserError(f"--ip-adapter {source}: no image_proj.* and ip_adapter.* weights; give an adapter in "
                        "diffusers' IP-Adapter format")
    return state


class _ImageEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        out = self.encoder(pixel_values, output_hidden_states=True, return_dict=True)
        return out.image_embeds, out.hidden_states[-2]


class _RegionScale:
    """One adapter's scale with InstantID's region mask at one attention resolution ([B, tokens, 1]): diffusers'
    IPAdapterAttnProcessor2_0 adds `scale * ip`, which this makes scale · (ip · mask), InstantID's order."""

    def __init__(self, scale, mask):
        self.scale, self.mask = scale, mask

    def __mul__(self, ip):
        return self.scale * (ip * self.mask)

    __rmul__ = __mul__

    def __eq__(self, other):  # diffusers skips a branch whose scale == 0; scale 0 here adds exact zeros instead
        return False

    __hash__ = None


def attention_levels(unet) -> list[int]:
    """The UNet level k (latent ÷ 2^k) of each IP-Adapter processor, in attn_processors order: down_blocks.i at i,
    the mid block at the last level, up_blocks.j at (levels − 1 − j) (each block but the last ends in a resampler)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    last = len(unet.config.block_out_channels) - 1
    levels = []
    for name, p in unet.attn_processors.items():
        if isinstance(p, IPAdapterAttnProcessor2_0):
            head, _, rest = name.partition(".")
            index = int(rest.partition(".")[0]) if head in ("down_blocks", "up_blocks") else 0
            levels.append(index if head == "down_blocks" else last - index if head == "up_blocks" else last)
    return levels


class _UNetIp(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, residuals…], ip_image_embeds_0…N-1,
    ip_scale_0…N-1[, ip_mask]) → out_sample; `residuals` down-block residuals and the mid one when ControlNets feed
    it; `mask_slot` the adapter (InstantID's) whose branch ip_mask multiplies."""

    def __init__(self, unet, added: bool, residuals: int = 0, adapters: int = 1, mask_slot: int | None = None):
        super().__init__()
        self.unet = unet
        self.added = added
        self.residuals = residuals
        self.adapters = adapters
        self.mask_slot = mask_slot
        self.levels = attention_levels(unet) if mask_slot is not None else []

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        added, rest = split_added_cond(rest, self.added)
        control = {}
        if self.residuals:
            *down, mid = rest[:self.residuals]
            rest = rest[self.residuals:]
            control = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        embeds, scales = list(rest[:self.adapters]), list(rest[self.adapters:2 * self.adapters])
        processors = [p for p in self.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        per_processor = [scales] * len(processors)
        if self.mask_slot is not None:
            mask, k = rest[2 * self.adapters], self.mask_slot
            per_processor = []
            for level in self.levels:  # nearest by 2^level: every 2^level-th row and column, tokens row-major
                step = 2 ** level
                tokens = mask[:, :, ::step, ::step].flatten(2).transpose(1, 2)
                per_processor.append([*scales[:k], _RegionScale(scales[k], tokens), *scales[k + 1:]])
        saved = [p.scale for p in processors]
        for p, s in zip(processors, per_processor):
            p.scale = s
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=(added or {}) | {"image_embeds": embeds},
                             return_dict=False, **control)[0]
        finally:
            for p, s in zip(processors, saved):
                p.scale = s


def image_encoder_spec(loaded: dict) -> ComponentSpec:
    encoder = loaded["encoder"]
    size = encoder.config.image_size

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        return (torch.randn(shape.batch, 3, size, size, generator=g).to(dtype),)

    axes = {"pixel_values": {0: "batch_size"}, "image_embeds": {0: "batch_size"},
            "penultimate_hidden_states": {0: "batch_size"}}
    return ComponentSpec(IMAGE_ENCODER, ("pixel_values",), ("image_embeds", "penultimate_hidden_states"), axes,
                         lambda p: _ImageEncoder(encoder), make_inputs, owner=lambda p: encoder)


def unet_ip_spec(pipe, loaded: dict, with_residuals: bool = False) -> ComponentSpec:
    """unet_ip, or with_residuals unet_controlnet_ip (the residual inputs of export/extras/controlnet.py too)."""
    unet = loaded["unet"]
    added = unet.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    if with_residuals:
        from sdrt.export.extras.controlnet import unet_residual_spec

        base = unet_residual_spec(pipe)
    residuals = len(base.input_names) - len(_unet_spec(added).input_names)
    enc = loaded["encoder"].config if loaded["encoder"] is not None else None
    records = loaded["record"]["adapters"]
    kinds = [a["kind"] for a in records]
    embeds = tuple(f"ip_image_embeds_{k}" for k in range(len(kinds)))
    scales = tuple(f"ip_scale_{k}" for k in range(len(kinds)))

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 13 + shape.latent_height)
        dims = [(shape.batch, 1, (enc.image_size // enc.patch_size) ** 2 + 1, enc.hidden_size) if uses_hidden_states(k)
                else (shape.batch, 1, r["tokens"], r["token_dim"]) if k == "instantid"
                else (shape.batch, 1, r["embed_dim"]) for k, r in zip(kinds, records)]
        return base.make_inputs(p, shape, dtype) + tuple(torch.randn(*d, generator=g).to(dtype) for d in dims) + \
            tuple(torch.tensor(0.8 - 0.1 * k) for k in range(len(kinds)))  # non-zero: every branch traced

    mask_slot = kinds.index("instantid") if with_residuals and "instantid" in kinds else None
    masks = (IP_MASK,) if mask_slot is not None else ()

    def make_all(p, shape: Shape, dtype):
        inputs = make_inputs(p, shape, dtype)
        if mask_slot is None:
            return inputs
        g = torch.Generator().manual_seed(shape.batch * 7 + shape.latent_width)  # 0/1: the branch both kept and cut
        mask = torch.rand(shape.batch, 1, shape.latent_height, shape.latent_width, generator=g) > 0.4
        return inputs + (mask.to(dtype),)

    axes = base.dynamic_axes | {name: {0: "batch_size", 1: "ip_images" + (f"_{k}" if k else "")}  # each its own count
                                for k, name in enumerate(embeds)}
    axes |= {IP_MASK: {0: "batch_size", 2: "height", 3: "width"}} if masks else {}  # the latent's axes
    return ComponentSpec(UNET_CONTROLNET_IP if with_residuals else UNET_IP,
                         base.input_names + embeds + scales + masks, base.output_names, axes,
                         lambda p: _UNetIp(unet, added, residuals, len(kinds), mask_slot), make_all,
                         ("timestep", *scales), owner=lambda p: unet)


def specs(pipe, loaded: dict, with_residuals: bool) -> dict:
    """{component: (spec, config.json content, key digest)}: the image encoder (when there is one), unet_ip (unless
    InstantID's is the only adapter: it always comes with its IdentityNet) and, `with_residuals` (ControlNets or
    InstantID in the directory), unet_controlnet_ip."""
    key, config = signature(loaded["record"]), dict(loaded["unet"].config)
    out = {}
    if loaded["encoder"] is not None:
        out[IMAGE_ENCODER] = (image_encoder_spec(loaded), loaded["encoder"].config.to_dict(), key)
    if any(a["kind"] != "instantid" for a in loaded["record"]["adapters"]):
        out[UNET_IP] = (unet_ip_spec(pipe, loaded), config, key)
    if with_residuals:
        masked = any(a["kind"] == "instantid" for a in loaded["record"]["adapters"])  # it takes ip_mask
        out[UNET_CONTROLNET_IP] = (unet_ip_spec(pipe, loaded, with_residuals=True), config,
                                   key + (MASK_KEY if masked else ""))
    return out


def write_configs(tmp: Path, loaded: dict) -> None:
    if loaded["encoder"] is not None:  # FaceID alone has none
        (tmp / IMAGE_ENCODER).mkdir(parents=True, exist_ok=True)
        (tmp / IMAGE_ENCODER / "config.json").write_text(loaded["encoder"].config.to_json_string())
        (tmp / IMAGE_ENCODER / "preprocessor_config.json").write_text(json.dumps(loaded["processor"], indent=2,
                                                                                 default=str))
    for name in (UNET_IP, UNET_CONTROLNET_IP):
        if (tmp / name).is_dir():
            (tmp / name / "config.json").write_text(json.dumps(dict(loaded["unet"].config), indent=2, default=str))
