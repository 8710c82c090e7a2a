"""PuLID's photo path at export (reference/identity.md §1, §3): `sdrt export MODEL --pulid FILE --pulid-eva EVA_FILE
--pulid-parsing PARSING_FILE` adds the two graphs that turn an aligned face crop into the EVA-CLIP part of the ID
encoder's inputs (runtime/conditioning/pulid_photo.py runs them).

- `pulid/eva`: EVA02-CLIP-L-14-336's visual tower as PuLID loads it (pipeline.py: eva_clip's
  create_model_and_transforms('EVA02-CLIP-L-14-336', 'eva_clip', force_custom_clip=True).visual), re-stated from
  eva_clip's eva_vit_model.py / rope.py: patch embedding, class token, absolute positions, blocks of
  [LN → attention (separate q/k/v projections, q and v biases, 2-D RoPE on the patch tokens, sub-LN before the output
  projection) + LN → SwiGLU (sub-LN before w3)], final LN, the class token through the head. pixels [N, 3, S, S]
  (already normalised with CLIP's mean/std) → eva_embedding [N, 768] (L2-normalised, as get_id_embedding does) and
  eva_hidden [N, 5, T, W] (the token sequences entering blocks 4, 8, 12, 16, 20: eva_clip's return_hidden).
  EVA_FILE is QuanSun/EVA-CLIP's `EVA02_CLIP_L_336_psz14_s6B.pt` (the whole CLIP: its `visual.` keys are kept, in a
  model/module/state_dict wrapper or not, "module." prefixes dropped, as eva_clip's load_state_dict does), or those
  keys alone without the prefix (.pt/.bin/.safetensors). open_clip's / timm's EVA layout (`visual.trunk.*`) is
  refused. Widths, depth, patch and image size are read from the tensors; the heads from the RoPE tables where the
  file has them (else 64-wide heads, EVA02-CLIP-L's head_width); the RoPE tables are computed as eva_clip does when
  it loads a RoPE model (it drops the file's: RoPE=1), from its pretraining grid of 16 (pt_hw_seq_len).
- `pulid/parsing`: facexlib's BiSeNet face parser (parsing/bisenet.py, resnet.py; `parsing_bisenet.pth`, 19
  CelebAMask-HQ classes), re-stated here with facexlib's state-dict names (facexlib imports torchvision, which does
  not import against sdrt's torch): pixels [N, 3, 512, 512] (RGB/255 normalised with ImageNet's mean/std, as
  get_id_embedding feeds it) → logits [N, 19, 512, 512] (the main output, bilinear with align_corners to the input
  size); the argmax and the class set are the runtime's. Its global poolings are means (ONNX ReduceMean), the
  same sums as facexlib's full-window avg_pool2d; the input stays 512² (facexlib's crop size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdrt.export.components import ComponentSpec, Shape
from sdrt.export.load import sha256_of_files
from sdrt.runtime.errors import UserError

EVA, PARSING = "pulid/eva", "pulid/parsing"
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)  # eva_clip's return_hidden: the inputs of the blocks 0 < i ≤ 20, i % 4 == 0
HEAD_WIDTH = 64  # EVA02-CLIP-L-14-336's head_width (model_configs), when the file has no RoPE tables
PT_GRID = 16  # its pt_hw_seq_len: the RoPE frequencies' pretraining grid, interpolated to the image's (intp_freq)
EPS = 1e-6  # eva_clip's LayerNorm eps
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # eva_clip's OPENAI_DATASET_MEAN / STD (constants.py)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PARSE_SIZE, PARSE_CLASSES = 512, 19
EVA_DOWNLOAD = "QuanSun/EVA-CLIP's EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_DOWNLOAD = "facexlib's parsing_bisenet.pth (its v0.2.0 release)"


@dataclass(frozen=True, eq=False)
class PhotoSource:
    eva_given: str
    eva_path: str
    eva_state: dict  # the visual tower's tensors, fp32, no prefix
    parsing_given: str
    parsing_path: str
    parsing_state: dict


def _load(flag: str, given: str, download: str) -> tuple[str, dict]:
    path = Path(given).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"{flag} {given}: no such file (give {download})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise their own errors on damaged or foreign files
        raise UserError(f"{flag} {given}: cannot read it as a PyTorch .pt/.pth/.bin or a .safetensors file "
                        f"({type(e).__name__}); give {download}") from None
    for key in ("model", "module", "state_dict"):  # eva_clip's load_state_dict: model|module|state_dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {given}: not a state dict of tensors; give {download}")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return str(path), state


def parse(eva: str | None, parsing: str | None) -> PhotoSource | None:
    """Both files read and their layouts checked, before the model loads; None when neither is given."""
    if eva is None and parsing is None:
        return None
    if eva is None or parsing is None:
        missing = "--pulid-eva (" + EVA_DOWNLOAD + ")" if eva is None else "--pulid-parsing (" + PARSING_DOWNLOAD + ")"
        raise UserError(f"PuLID's photo path needs both --pulid-eva and --pulid-parsing; add {missing}")
    eva_path, state = _load("--pulid-eva", eva, EVA_DOWNLOAD)
    if any(k.startswith("visual.trunk.") or k.startswith("trunk.") for k in state):
        raise UserError(f"--pulid-eva {eva}: open_clip's/timm's EVA layout (visual.trunk.*) is not what PuLID "
                        f"loads; give {EVA_DOWNLOAD}")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if "blocks.0.attn.q_proj.weight" not in state or "head.weight" not in state or "pos_embed" not in state:
        raise UserError(f"--pulid-eva {eva}: no EVA02-CLIP visual tower (visual.blocks.<i>.attn.q_proj, "
                        f"visual.pos_embed, visual.head); give {EVA_DOWNLOAD}")
    parsing_path, pstate = _load("--pulid-parsing", parsing, PARSING_DOWNLOAD)
    out = pstate.get("conv_out.conv_out.weight")
    if out is None or "cp.resnet.conv1.weight" not in pstate:
        raise UserError(f"--pulid-parsing {parsing}: not facexlib's BiSeNet (cp.resnet.*, conv_out.*); give "
                        f"{PARSING_DOWNLOAD}")
    if out.shape[0] != PARSE_CLASSES:
        raise UserError(f"--pulid-parsing {parsing}: {out.shape[0]} classes; PuLID's parsing has CelebAMask-HQ's "
                        f"{PARSE_CLASSES}")
    return PhotoSource(eva, eva_path, {k: v.float() for k, v in state.items()}, parsing, parsing_path,
                       {k: v.float() if v.is_floating_point() else v for k, v in pstate.items()})


# ---- EVA02-CLIP's visual tower ----

def rope_tables(head_dim: int, grid: int, pt_grid: int = PT_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """eva_clip's VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=pt_grid, ft_seq_len=grid): per patch (row r,
    column c), the first half of the head's channels turn with r's angles and the second half with c's, each
    frequency on an adjacent channel pair; positions are r·pt_grid/grid. → (cos, sin) [grid², head_dim]."""
    half = head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = (torch.arange(grid) / grid * pt_grid)[:, None] * inv[None]  # [grid, half/2]
    angles = angles.repeat_interleave(2, dim=-1)  # each frequency on a channel pair
    rows = angles[:, None, :].expand(grid, grid, half)
    cols = angles[None, :, :].expand(grid, grid, half)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1) → (−x1, x0) on each adjacent channel pair (rope.py's rotate_half)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class _Attention(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(width, width, bias=False)
        self.k_proj = torch.nn.Linear(width, width, bias=False)
        self.v_proj = torch.nn.Linear(width, width, bias=False)
        self.q_bias = torch.nn.Parameter(torch.zeros(width))
        self.v_bias = torch.nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = torch.nn.LayerNorm(width, eps=EPS)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x, cos, sin):
        b, n, w = x.shape

        def heads(t):
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))

        def turned(t):  # RoPE on the patch tokens, the class token as it is
            patches = t[:, :, 1:]
            return torch.cat([t[:, :, :1], patches * cos + _rotate_pairs(patches) * sin], dim=2)

        out = F.scaled_dot_product_attention(turned(q), turned(k), v)  # scale head_dim^-0.5, as eva_clip's
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, w)))


class _SwiGlu(torch.nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = torch.nn.Linear(width, hidden), torch.nn.Linear(width, hidden)
        self.ffn_ln = torch.nn.LayerNorm(hidden, eps=EPS)
        self.w3 = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width, eps=EPS), torch.nn.LayerNorm(width, eps=EPS)
        self.attn = _Attention(width, heads)
        self.mlp = _SwiGlu(width, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class EvaVisual(torch.nn.Module):
    """EVA02-CLIP's visual tower (eva_clip's EVAVisionTransformer as its EVA02 configs build it) over its state dict:
    pixels → (eva_embedding [N, D] L2-normalised, eva_hidden [N, 5, T, W])."""

    def __init__(self, state: dict, given: str = "the file"):
        super().__init__()
        patch = state["patch_embed.proj.weight"]
        width, size = patch.shape[0], patch.shape[-1]
        tokens = state["pos_embed"].shape[1]
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise UserError(f"--pulid-eva {given}: {tokens} positions are not a square grid and a class token")
        depth = 0
        while f"blocks.{depth}.norm1.weight" in state:
            depth += 1
        if depth <= HIDDEN_BLOCKS[-1]:
            raise UserError(f"--pulid-eva {given}: {depth} blocks; PuLID reads the inputs of blocks "
                            f"{', '.join(map(str, HIDDEN_BLOCKS))} (EVA02-CLIP-L has 24)")
        table = state.get("rope.freqs_cos", state.get("blocks.0.attn.rope.freqs_cos"))
        head_dim = table.shape[-1] if table is not None else HEAD_WIDTH
        if width % head_dim:
            raise UserError(f"--pulid-eva {given}: width {width} is not a multiple of its {head_dim}-wide heads")
        hidden = state["blocks.0.mlp.w1.weight"].shape[0]
        self.image_size, self.patch, self.grid, self.width = size * grid, size, grid, width
        self.heads, self.depth, self.embed_dim = width // head_dim, depth, state["head.weight"].shape[0]
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, width, size, stride=size)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = torch.nn.ModuleList(_Block(width, self.heads, hidden) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width, eps=EPS)
        self.head = torch.nn.Linear(width, self.embed_dim)
        self.rope = rope_tables(head_dim, grid)  # plain tensors: traced as constants, never cast by .half()
        weights = {k: v for k, v in state.items() if ".rope." not in k and not k.startswith("rope.")}
        try:
            self.load_state_dict(weights)
        except RuntimeError as e:
            raise UserError(f"--pulid-eva {given}: not EVA02-CLIP's visual layout as PuLID loads it "
                            f"({str(e).splitlines()[0]}); give {EVA_DOWNLOAD}") from None

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        cos, sin = (t.to(x.dtype) for t in self.rope)
        hidden = []
        for i, block in enumerate(self.blocks):
            if i in HIDDEN_BLOCKS:
                hidden.append(x)
            x = block(x, cos, sin)
        v = self.head(self.norm(x)[:, 0])
        return v / v.norm(dim=-1, keepdim=True), torch.stack(hidden, dim=1)


# ---- facexlib's BiSeNet ----

class _ConvBnRelu(torch.nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _Basic(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              torch.nn.BatchNorm2d(cout)) if cin != cout or stride != 1 else None

    def forward(self, x):
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(branch + (x if self.downsample is None else self.downsample(x)))


class _ResNet18(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        for i, (cin, cout, stride) in enumerate(((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)), 1):
            setattr(self, f"layer{i}", torch.nn.Sequential(_Basic(cin, cout, stride), _Basic(cout, cout, 1)))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


def _pooled(x):
    return x.mean(dim=(2, 3), keepdim=True)


class _Refine(torch.nn.Module):  # facexlib's AttentionRefinementModule
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBnRelu(cin, cout)
        self.conv_atten = torch.nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = torch.nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_pooled(feat))))


class _ContextPath(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16, self.arm32 = _Refine(256, 128), _Refine(512, 128)
        self.conv_head32, self.conv_head16 = _ConvBnRelu(128, 128), _ConvBnRelu(128, 128)
        self.conv_avg = _ConvBnRelu(512, 128, k=1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        up32 = self.arm32(f32) + self.conv_avg(_pooled(f32))  # the 1×1 context broadcast (nearest resize)
        up32 = self.conv_head32(F.interpolate(up32, f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
        return f8, up16


class _Fusion(torch.nn.Module):  # facexlib's FeatureFusionModule
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBnRelu(cin, cout, k=1)
        self.conv1 = torch.nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = torch.nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a, b):
        feat = self.convblk(torch.cat([a, b], dim=1))
        return feat * (1 + torch.sigmoid(self.conv2(F.relu(self.conv1(_pooled(feat))))))


class _Output(torch.nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = _ConvBnRelu(cin, mid)
        self.conv_out = torch.nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(torch.nn.Module):
    """facexlib's BiSeNet(num_class=19): its main output only (conv_out16/32 are its training heads, loaded and
    unused, as get_id_embedding uses [0])."""

    def __init__(self, classes: int = PARSE_CLASSES):
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _Fusion(256, 256)
        self.conv_out = _Output(256, 256, classes)
        self.conv_out16, self.conv_out32 = _Output(128, 64, classes), _Output(128, 64, classes)

    def forward(self, x):
        f8, up16 = self.cp(x)
        out = self.conv_out(self.ffm(f8, up16))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def bisenet(state: dict, given: str = "the file") -> BiSeNet:
    net = BiSeNet()
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"--pulid-parsing {given}: not facexlib's BiSeNet layout ({str(e).splitlines()[0]}); give "
                        f"{PARSING_DOWNLOAD}") from None
    return net.eval().requires_grad_(False)


# ---- the export's specs and the manifest record ----

def load(src: PhotoSource, pulid_record: dict) -> dict:
    """{"eva", "parsing": modules, "record": the pulid record's "photo" entry}; the EVA tower must fit the ID encoder
    of --pulid (its embedding width, its hidden states' count and width)."""
    eva = EvaVisual(src.eva_state, src.eva_given).eval().requires_grad_(False)
    parsing = bisenet(src.parsing_state, src.parsing_given)
    want = (pulid_record["eva_dim"], pulid_record["eva_layers"], pulid_record["eva_width"])
    if (eva.embed_dim, len(HIDDEN_BLOCKS), eva.width) != want:
        raise UserError(f"--pulid-eva {src.eva_given}: a {eva.embed_dim}-wide embedding and {eva.width}-wide hidden "
                        f"states; the --pulid file's ID encoder takes {want[0]} and {want[2]} (EVA02-CLIP-L-14-336)")
    eva_file, parsing_file = Path(src.eva_path), Path(src.parsing_path)
    record = {"eva": {"graph": EVA, "source": src.eva_path, "sha256": sha256_of_files([eva_file], eva_file.parent),
                      "image_size": eva.image_size, "patches": eva.grid * eva.grid + 1, "mean": list(CLIP_MEAN),
                      "std": list(CLIP_STD)},
              "parsing": {"graph": PARSING, "source": src.parsing_path,
                          "sha256": sha256_of_files([parsing_file], parsing_file.parent), "size": PARSE_SIZE,
                          "classes": PARSE_CLASSES}}
    return {"eva": eva, "parsing": parsing, "record": record}


def specs(loaded: dict) -> dict:
    """{component: (spec, config.json content, key digest)} for pulid/eva and pulid/parsing."""
    eva, parsing, record = loaded["eva"], loaded["parsing"], loaded["record"]

    def eva_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 11 + 1)
        return (torch.randn(shape.batch, 3, eva.image_size, eva.image_size, generator=g).to(dtype),)

    def parsing_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 13 + 2)
        return (torch.randn(shape.batch, 3, PARSE_SIZE, PARSE_SIZE, generator=g).to(dtype),)

    eva_spec = ComponentSpec(EVA, ("pixel_values",), ("eva_embedding", "eva_hidden"),
                             {"pixel_values": {0: "batch_size"}, "eva_embedding": {0: "batch_size"},
                              "eva_hidden": {0: "batch_size"}}, lambda p: eva, eva_inputs, owner=lambda p: eva)
    parsing_spec = ComponentSpec(PARSING, ("pixel_values",), ("logits",),
                                 {"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}},
                                 lambda p: parsing, parsing_inputs, owner=lambda p: parsing)
    eva_config = {"image_size": eva.image_size, "patch_size": eva.patch, "width": eva.width, "heads": eva.heads,
                  "layers": eva.depth, "embed_dim": eva.embed_dim, "hidden_blocks": list(HIDDEN_BLOCKS),
                  "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    return {EVA: (eva_spec, eva_config, "|pulid-eva:" + record["eva"]["sha256"]),
            PARSING: (parsing_spec, {"size": PARSE_SIZE, "classes": PARSE_CLASSES},
                      "|pulid-parsing:" + record["parsing"]["sha256"])}
