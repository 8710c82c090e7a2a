"""Few-step presets, set the way the models' authors prescribe (reference/fewstep_perf.md §1.1-1.2).

SDXL-Lightning (ByteDance model card): Euler, timestep_spacing "trailing", guidance 0, steps equal to the
checkpoint's; the 1-step checkpoint predicts x0 (prediction_type "sample"). SDXL-Turbo: Euler ancestral,
trailing, 1 step, guidance 0 (its Hub scheduler config; diffusers' sdxl_turbo doc). FLUX.1-schnell: flow-match
Euler, 4 steps, no guidance (black-forest-labs' model card; its transformer has no guidance embedding); SD 3.5 Large
Turbo: flow-match Euler, 4 steps, guidance 0 (stabilityai's model card). Flow models have no timestep spacing.
PuLID v1 on SDXL-Lightning's 4-step UNet (PuLID's pipeline.py and app.py, reference/identity.md §3): DPM++ 2M from
the base config with trailing spacing, 4 steps, CFG 1.2; its ID scale 0.8 is the pulid_scale default. (PuLID pins
diffusers 0.25, whose DPM-Solver may end at sigma_min rather than 0: unverified; this preset ends at 0.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    sampler: str
    timestep_spacing: str | None
    steps: int
    guidance: float
    prediction_type: str | None = None


PRESETS = {
    "lightning-1step": Preset("euler", "trailing", 1, 0.0, prediction_type="sample"),
    "lightning-2step": Preset("euler", "trailing", 2, 0.0),
    "lightning-4step": Preset("euler", "trailing", 4, 0.0),
    "lightning-8step": Preset("euler", "trailing", 8, 0.0),
    "turbo": Preset("euler_a", "trailing", 1, 0.0),
    "flux-schnell": Preset("flow_euler", None, 4, 0.0),
    "sd35-turbo": Preset("flow_euler", None, 4, 0.0),
    "pulid-lightning": Preset("dpmpp_2m", "trailing", 4, 1.2),
}
