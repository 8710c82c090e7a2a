"""ControlNet at run time: the request's control images validated, preprocessed and turned into a UNet-call
contributor (runtime/denoiser/call.py) that runs each ControlNet engine and feeds the residual UNet.

Engines (export/extras/controlnet.py): `controlnet/NAME/model.onnx` (sample, timestep, encoder_hidden_states,
controlnet_cond, conditioning_scale [, text_embeds, time_ids] → down_block_res_sample_0…k, mid_block_res_sample)
and `unet_controlnet/model.onnx`, the UNet with inputs down_block_additional_residual_0…k and
mid_block_additional_residual. Everything reproduces diffusers' StableDiffusion[XL]ControlNetPipeline
(pipelines/controlnet/pipeline_controlnet{,_sd_xl}.py) and MultiControlNetModel:
- the control image: RGB, resized to the output size with PIL Lanczos, float32 in [0, 1], NCHW
  (VaeImageProcessor(do_normalize=False).preprocess), repeated to the batch, doubled for guidance unless guess mode;
- keep_i = 1 − [i/N < start or (i+1)/N > end] over the N timesteps, per net (diffusers' control_guidance_start/end
  lists; one window for all by default); a net whose keep is 0 is not run at all (diffusers runs it with scale 0 and
  adds exact zeros), so a step with no net kept feeds zero residuals;
- several nets: residuals summed in the nets' order (first net's tensors, then + the next);
- guess mode: each residual i × logspace(−1, 0, n)[i] · scale (ControlNetModel.forward L781-785); with guidance the
  nets see only the conditional half and zeros stand for the unconditional half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.conditioning.graphs import CONTROLNET, graph_for
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime import fields
from sdrt.runtime.fields import InvalidRequest

UNET_CONTROLNET = graph_for({CONTROLNET})
NAME, FIELD = CONTROLNET, "controls"  # its name in Job.uses and graphs.py, the Job field of its use
PREFIX = "controlnet/"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MID = "mid_block_res_sample"
MID_INPUT = "mid_block_additional_residual"


def down_output(i: int) -> str:
    return f"down_block_res_sample_{i}"


def down_input(i: int) -> str:
    return f"down_block_additional_residual_{i}"


def residual_shapes(unet_config: dict, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(channels, height, width, divisor) of each down-block residual, then the mid-block one, for latents of
    height × width: conv_in, every resnet of every down block, every down-sampler (3×3 stride-2 conv: ⌈s/2⌉),
    as diffusers' UNet2DConditionModel collects `down_block_res_samples`."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out = [(channels[0], height, width, 1)]
    div = 1
    for b, c in enumerate(channels):
        out += [(c, height, width, div)] * layers[b]
        if b < len(channels) - 1:
            height, width, div = (height + 1) // 2, (width + 1) // 2, div * 2
            out.append((c, height, width, div))
    return out + [(channels[-1], height, width, div)]


def controlnet_names(model_dir) -> list[str]:
    """The ControlNets an engine directory holds (manifest components controlnet/NAME), in export order."""
    components = (model_dir.manifest or {}).get("components", {})
    return [c[len(PREFIX):] for c in components if c.startswith(PREFIX)]


def controlnet_record(model_dir, name: str) -> dict:
    return next((r for r in (model_dir.manifest or {}).get("controlnets", []) if r["name"] == name), {})


# ---- request → validated controls -----------------------------------------------------------------------

@dataclass(frozen=True)
class ControlUse:
    name: str
    image: Image.Image  # RGB
    scale: float
    start: float = 0.0  # this net's window [start, end) of the schedule
    end: float = 1.0


@dataclass(frozen=True, eq=False)
class Controls:
    """A request's validated ControlNet inputs (runtime/validate.py Job.controls)."""
    nets: tuple[ControlUse, ...]
    start: float
    end: float
    guess_mode: bool

    def key(self) -> tuple:
        """What two jobs must share to run in one batch (runtime/batching.py)."""
        return (tuple((u.name, id(u.image), u.scale, u.start, u.end) for u in self.nets), self.start, self.end,
                self.guess_mode)


def _entry(i: int, entry) -> tuple:
    """(name, image, scale, start, end) from a tuple/list (name, image[, scale]) or a mapping {name, image[, scale]
    [, start, end]}; start/end None where the request's control_start/control_end apply."""

    field = f"controls[{i}]"
    if isinstance(entry, dict):
        unknown = set(entry) - {"name", "image", "scale", "start", "end"}
        if unknown:
            raise InvalidRequest(field, f"unknown key(s) {', '.join(sorted(unknown))}; give name, image, scale (and "
                                        "start, end for this net's window)")
        if "name" not in entry or "image" not in entry:
            raise InvalidRequest(field, "needs a name and an image")
        return entry["name"], entry["image"], entry.get("scale", 1.0), entry.get("start"), entry.get("end")
    if isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
        return entry[0], entry[1], entry[2] if len(entry) == 3 else 1.0, None, None
    raise InvalidRequest(field, "must be (name, image[, scale]) or {name, image, scale, start, end}")


def validate(request, model_dir, context) -> Controls | None:
    """The request's Control group checked against the directory's ControlNets; None when it asks for none."""
    group = request.control
    entries = group.controls
    if not isinstance(entries, (tuple, list)):
        raise InvalidRequest("controls", "must be a list of (name, image, scale) entries")
    start = fields.number("control_start", group.control_start, 0.0, 1.0)
    end = fields.number("control_end", group.control_end, 0.0, 1.0)
    if not isinstance(group.guess_mode, bool):
        raise InvalidRequest("guess_mode", f"must be true or false, not {group.guess_mode!r}")
    if not entries:
        return None
    if start >= end:
        raise InvalidRequest("control_start", f"must be below control_end (got start {start:g}, end {end:g})")
    from sdrt.runtime.conditioning.preprocess import parse

    preprocess = parse(group.control_preprocess)
    have = controlnet_names(model_dir)
    nets = []
    for i, entry in enumerate(entries):
        name, image, scale, net_start, net_end = _entry(i, entry)
        if not isinstance(name, str) or name not in have:
            listed = (f"this model has {', '.join(have)}" if have else
                      "this engine directory has none (export one with --controlnet)")
            raise InvalidRequest(f"controls[{i}].name", f"unknown ControlNet {name!r}; {listed}")
        scale = fields.number(f"controls[{i}].scale", scale)
        image = fields.image(f"controls[{i}].image", image, "RGB")
        if image is None:
            raise InvalidRequest(f"controls[{i}].image", "is required: the control image for " + name)
        net_start = start if net_start is None else fields.number(f"controls[{i}].start", net_start, 0.0, 1.0)
        net_end = end if net_end is None else fields.number(f"controls[{i}].end", net_end, 0.0, 1.0)
        if net_start >= net_end:
            raise InvalidRequest(f"controls[{i}].start", f"must be below its end (got start {net_start:g}, end "
                                                         f"{net_end:g})")
        nets.append(ControlUse(name, preprocess(image) if preprocess else image, scale, net_start, net_end))
    if not model_dir.has(UNET_CONTROLNET):
        raise InvalidRequest("controls", f"{model_dir.path} has no {UNET_CONTROLNET} graph; re-export with "
                                         "--controlnet")
    return Controls(tuple(nets), start, end, group.guess_mode)


# ---- preprocessing and the contributor -------------------------------------------------------------------

def control_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL → [1, 3, H, W] float32 in [0, 1]: diffusers' control_image_processor (do_convert_rgb, Lanczos resize,
    no normalization)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


@dataclass(frozen=True)
class _Net:
    engine: Any
    image: torch.Tensor  # [B or 2B, 3, H, W]
    scale: float
    pooled: bool  # global_pool_conditions: residuals are spatial means and guess mode is forced (shuffle nets)
    start: float = 0.0
    end: float = 1.0

    def keep(self, step) -> bool:
        """diffusers' controlnet_keep[i] for this net at the step."""
        i, n = step.index, step.count
        return not (i / n < self.start or (i + 1) / n > self.end)


@dataclass(frozen=True)
class ControlNetContributor:
    """Writes down_block_additional_residual_i and mid_block_additional_residual into the UNet feed."""
    nets: tuple[_Net, ...]
    guess_mode: bool
    guided: bool  # classifier-free guidance doubles the batch (uncond half first)
    unet_config: dict

    def contribute(self, feed, step):
        kept = [net for net in self.nets if net.keep(step)]
        residuals = self._residuals(feed, step, kept) if kept else None
        if residuals is None:
            b, _, h, w = step.latents.shape
            residuals = [torch.zeros(b, c, rh, rw) for c, rh, rw, _ in residual_shapes(self.unet_config, h, w)]
        *down, mid = residuals
        return feed | {down_input(i): r for i, r in enumerate(down)} | {MID_INPUT: mid}

    def _residuals(self, feed, step, nets) -> list[torch.Tensor]:
        half = self.guess_mode and self.guided  # the nets see the conditional half only
        pick = (lambda x: x.chunk(2)[1]) if half else (lambda x: x)
        inputs = {"sample": pick(step.latents), "timestep": torch.tensor(step.t, dtype=torch.float32),
                  "encoder_hidden_states": pick(feed["encoder_hidden_states"])}
        total = None
        for net in nets:
            extra = {k: pick(feed[k]) for k in ("text_embeds", "time_ids") if k in net.engine.inputs}
            logspace = self.guess_mode and not net.pooled
            scale = torch.tensor(1.0 if logspace else net.scale, dtype=torch.float32)
            out = feed_mod.run(net.engine, **inputs, **extra, controlnet_cond=net.image, conditioning_scale=scale)
            res = [out[down_output(i)] for i in range(len(out) - 1)] + [out[MID]]
            if logspace:  # ControlNetModel.forward: scales = logspace(-1, 0, n + 1) * conditioning_scale
                scales = torch.logspace(-1, 0, len(res)) * net.scale
                res = [r * s for r, s in zip(res, scales)]
            total = res if total is None else [a + r for a, r in zip(total, res)]  # MultiControlNetModel order
        if half:
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        return total


def contributor_of(controls: Controls, engines: dict, model_dir, count: int, width: int, height: int,
                guided: bool) -> ControlNetContributor:
    """`engines`: ControlNet name → its engine. `count`: images in the batch."""
    guess = controls.guess_mode or any(controlnet_record(model_dir, u.name).get("global_pool_conditions")
                                       for u in controls.nets)
    nets = []
    for use in controls.nets:
        image = control_image(use.image, width, height).repeat_interleave(count, dim=0)
        if guided and not guess:
            image = torch.cat([image] * 2)
        pooled = bool(controlnet_record(model_dir, use.name).get("global_pool_conditions"))
        nets.append(_Net(engines[use.name], image, use.scale, pooled, use.start, use.end))
    return ControlNetContributor(tuple(nets), guess, guided, dict(model_dir.unet_config))


def attach(parts, job, prep):
    """`prep` unchanged without ControlNets; else with runtime/conditioning/controlnet.ControlNetContributor added
    (its nets opened on first use and kept)."""
    if job.controls is None:
        return prep
    engines = {u.name: parts.component(PREFIX + u.name) for u in job.controls.nets}
    contributor = contributor_of(job.controls, engines, parts.dir, job.count, job.width, job.height,
                                 prep.guidance.enabled)
    return replace(prep, contributors=[*prep.contributors, contributor])
