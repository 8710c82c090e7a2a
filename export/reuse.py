"""What an export keeps of the directory it replaces: components whose key and files still match (reused by hard link,
not traced again), and the extras (ControlNets, IP-Adapter, T2I-Adapters, a tiny VAE) that a re-export not naming
them again leaves in place."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.export.extras import controlnet as cn, ip_adapter as ipa, t2i_adapter as t2i, tiny_vae
from sdrt.export.load import sha256_of_file
from sdrt.export.onnx_export import OPSET

EXPORT_REVISION = "6"  # bump when the exported graphs change for the same source (3: UNet takes any latent size;
# 4: UNet and text encoders keep their weights in model.onnx_data with a weights_map.json, for LoRAs at load;
# 5: no symbolic value_info from the constant folder, which broke fp32 UNets at odd latent sizes;
# 6: the SD3 / FLUX.1 transformers and SD3's T5 get model.onnx_data and a weights_map.json too)


def component_key(source_sha: str, name: str, precision: str) -> str:
    return hashlib.sha256(f"{source_sha}|{name}|{precision}|{OPSET}|{EXPORT_REVISION}".encode()).hexdigest()


def reusable(old: dict | None, out: Path, name: str, key: str) -> dict | None:
    entry = (old or {}).get("components", {}).get(name)
    if not entry or entry.get("key") != key or not entry["gate"]["passed"]:
        return None
    for rel, digest in entry["sha256"].items():
        path = out / name / rel
        if not path.exists() or sha256_of_file(path) != digest:
            return None
    return entry


def kept_controlnets(old: dict | None, output: Path, given: set[str], new_ip: bool, new_t2i: set[str] = frozenset()) -> dict:
    """ControlNet and IP-Adapter components of the existing directory that stay (not given again, files intact)."""
    kept = {}
    for name, entry in (old or {}).get("components", {}).items():
        extra = (name.startswith(cn.PREFIX) and name[len(cn.PREFIX):] not in given) or \
            (name in (ipa.IMAGE_ENCODER, ipa.UNET_IP, ipa.UNET_CONTROLNET_IP) and not new_ip) or \
            (name.startswith(t2i.PREFIX) and name[len(t2i.PREFIX):] not in new_t2i) or (name == t2i.UNET_T2I and not new_t2i)
        if extra and reusable(old, output, name, entry.get("key")) is not None:
            kept[name] = entry
    if ipa.IMAGE_ENCODER in (old or {}).get("components", {}) and (ipa.IMAGE_ENCODER in kept) != (ipa.UNET_IP in kept):
        # the two only work together (FaceID alone has no image encoder)
        kept.pop(ipa.IMAGE_ENCODER, None), kept.pop(ipa.UNET_IP, None)
    return kept


def kept_tiny_vae(cfg, old: dict | None, output: Path, signature: str) -> tuple[dict, dict | None]:
    """The directory's tiny VAE components when cfg names them without a tiny VAE source (add_controlnets): reused
    by the keys an export with that source gives them, so the source is not needed again. ({name: entry}, the
    manifest's tiny_vae record)."""
    record = (old or {}).get("tiny_vae")
    wanted = [n for n in (tiny_vae.TINY_DECODER, tiny_vae.TINY_ENCODER) if n in (cfg.components or ())]
    if cfg.tiny_vae is not None or not record or not wanted:
        return {}, None
    kept = {}
    for name in wanted:
        key = component_key(signature + "|tiny:" + record["signature"], name, cfg.precision)
        kept[name] = reusable(old, output, name, key)
        if kept[name] is None:
            raise UserError(f"{output}/{name} cannot be reused (its files or the model changed); export again with "
                            f"--tiny-vae {record['location']}")
    return kept, record
