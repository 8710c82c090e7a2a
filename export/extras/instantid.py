"""InstantID at export (reference/identity.md §4): `sdrt export MODEL --instantid DIR`, DIR as InstantX/InstantID
ships it (`ControlNetModel/` = IdentityNet, `ip-adapter.bin` or `.safetensors` = {image_proj: Resampler,
ip_adapter: <i>.to_{k,v}_ip}); or `--instantid CONTROLNET_DIR,ADAPTER_FILE` for the two given separately.

Three graphs:
- `instantid/identitynet`: the ControlNet graph of export/extras/controlnet.py, traced and gated with 16 context
  tokens: its encoder_hidden_states axis 1 is dynamic, InstantID feeds it the face tokens instead of the text;
- `instantid/proj`: the Resampler (diffusers' IPAdapterPlusImageProjection, which _convert_ip_adapter_image_proj_
  to_diffusers builds from InstantID's key layout), face_embeds [B, 1, 512] → face_tokens [B, 16, D]; the runtime
  caches its output per identity (Resampler(zeros) is the negative, as InstantID's pipeline takes it);
- the adapter's to_k_ip / to_v_ip in unet_controlnet_ip as an IP-Adapter of kind "instantid" fed those tokens
  (export/extras/ip_adapter.py).
SDXL only: InstantID's weights exist for SDXL alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape
from sdrt.export.extras import controlnet as cn

NAME = "instantid"  # the adapter's name among the directory's IP-Adapters
IDENTITYNET = "instantid/identitynet"
PROJ = "instantid/proj"
ADAPTER_FILES = ("ip-adapter.bin", "ip-adapter.safetensors")


@dataclass(frozen=True)
class InstantIdSource:
    given: str  # what --instantid named
    controlnet: str  # the IdentityNet folder
    adapter: str  # the ip-adapter file


def parse(text: str) -> InstantIdSource:
    """DIR (ControlNetModel/ and ip-adapter.bin|.safetensors in it) or CONTROLNET_DIR,ADAPTER_FILE; every file
    checked before the model loads."""
    what = f"--instantid {text}"
    if "," in text:
        net, _, adapter = (Path(p.strip()).expanduser().absolute() for p in text.partition(","))
    else:
        root = Path(text).expanduser().absolute()
        if not root.is_dir():
            raise UserError(f"{what}: no such folder (give InstantX/InstantID's folder: ControlNetModel/ and "
                            "ip-adapter.bin)")
        net = root / "ControlNetModel"
        adapter = next((root / f for f in ADAPTER_FILES if (root / f).is_file()), root / ADAPTER_FILES[0])
    if not (net / "config.json").is_file():
        raise UserError(f"{what}: {net} is not IdentityNet's ControlNet folder (no config.json); InstantID's folder "
                        "holds ControlNetModel/ and ip-adapter.bin")
    if not adapter.is_file():
        raise UserError(f"{what}: no {adapter.name} (InstantID's IP-Adapter: ip-adapter.bin or .safetensors)")
    return InstantIdSource(text, str(net), str(adapter))


def check_family(family: str, src: InstantIdSource | None) -> None:
    if src is not None and family != "sdxl":
        raise UserError(f"--instantid {src.given}: InstantID is SDXL-only; this model is {family}")


def load_identitynet(pipe, src: InstantIdSource, vae_factor: int):
    """(IdentityNet as ControlNetModel fp32, sha256 of its files), checked against this UNet."""
    net_src = cn.ControlNetSource(src.controlnet, "identitynet")
    net, digest = cn.load(net_src)
    cn.check_compatible(net, dict(pipe.unet.config), vae_factor, net_src)
    return net, digest


def identitynet_spec(pipe, net, tokens: int) -> ComponentSpec:
    """The ControlNet graph, traced and gated with `tokens` context rows (the face tokens)."""
    base = cn.controlnet_spec(pipe, "identitynet", net)

    def make_inputs(p, shape: Shape, dtype):
        sample, timestep, states, *rest = base.make_inputs(p, shape, dtype)
        g = torch.Generator().manual_seed(shape.batch * 17 + tokens)
        return (sample, timestep, torch.randn(shape.batch, tokens, states.shape[-1], generator=g).to(dtype), *rest)

    return replace(base, name=IDENTITYNET, make_inputs=make_inputs)


class _Proj(torch.nn.Module):
    def __init__(self, resampler):
        super().__init__()
        self.resampler = resampler

    def forward(self, face_embeds):
        return self.resampler(face_embeds)


def proj_spec(resampler, width: int) -> ComponentSpec:
    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 5 + 1)
        return (torch.randn(shape.batch, 1, width, generator=g).to(dtype),)

    axes = {"face_embeds": {0: "batch_size"}, "face_tokens": {0: "batch_size"}}
    return ComponentSpec(PROJ, ("face_embeds",), ("face_tokens",), axes, lambda p: _Proj(resampler), make_inputs,
                         owner=lambda p: resampler)


def specs(pipe, src: InstantIdSource, net, digest: str, ip_loaded: dict) -> dict:
    """{component: (spec, config.json content, key digest)} for IdentityNet and the Resampler."""
    adapter = next(a for a in ip_loaded["record"]["adapters"] if a["name"] == NAME)
    resampler = ip_loaded["projections"][NAME]
    proj_config = {"embed_dim": adapter["embed_dim"], "tokens": adapter["tokens"], "token_dim": adapter["token_dim"]}
    return {IDENTITYNET: (identitynet_spec(pipe, net, adapter["tokens"]), dict(net.config), "|iid-cn:" + digest),
            PROJ: (proj_spec(resampler, adapter["embed_dim"]), proj_config, "|iid-proj:" + adapter["sha256"])}


def record(src: InstantIdSource, ip_loaded: dict) -> dict:
    """The manifest's `instantid` entry."""
    adapter = next(a for a in ip_loaded["record"]["adapters"] if a["name"] == NAME)
    return {"source": f"{src.controlnet},{src.adapter}", "controlnet": IDENTITYNET, "projection": PROJ, "adapter": NAME,
            "embed_dim": adapter["embed_dim"], "tokens": adapter["tokens"], "token_dim": adapter["token_dim"]}
