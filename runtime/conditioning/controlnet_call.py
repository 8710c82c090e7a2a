"""Joining a validated job's ControlNets to a prepared run: the residual UNet and the ControlNet contributor."""

from __future__ import annotations

from dataclasses import replace

from sdrt.runtime.conditioning import controlnet


def attach(pipe, job, prep):
    """`prep` unchanged without ControlNets; else fed by runtime/controlnet.ControlNetContributor through the
    residual UNet (engines opened on first use and kept)."""
    if job.controls is None:
        return prep
    engines = {u.name: pipe.component(controlnet.PREFIX + u.name) for u in job.controls.nets}
    pipe.component(controlnet.UNET_CONTROLNET)
    contributor = controlnet.contributor(job.controls, engines, pipe.dir, job.count, job.width, job.height,
                                         prep.guidance.enabled)
    return replace(prep, contributors=[*prep.contributors, contributor], unet=controlnet.UNET_CONTROLNET)
