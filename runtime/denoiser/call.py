"""The composed UNet call (DESIGN.md §4a): each step's feed is assembled from contributors.

A contributor is a small object with `contribute(feed, step) -> feed`: it reads the step (which evaluation,
the guidance-batched latents) and returns the feed with its inputs added or replaced. Text conditioning and
the inpainting channels are contributors here; ControlNet residuals, IP-Adapter embeddings, class labels and
cached features join the same list instead of adding branches to the sampler loop. Contributors never see
each other's internals: the order of the list is the order their inputs are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.prompts.text_conditioning import Conditioning
from sdrt.runtime.denoiser.guidance import Guidance


@dataclass(frozen=True)
class UnetStep:
    """One UNet evaluation. `index`: the step of the (windowed) schedule this evaluation belongs to, 0-based;
    `count`: how many steps that schedule has; `t`: the model timestep; `latents`: the guidance-batched, scaled
    latents [B(·2), 4, h, w] before any extra channels."""
    index: int
    count: int
    t: float
    latents: torch.Tensor


class Contributor(Protocol):
    """May also define `restore(out, step) -> out`: the model output back in the latents' layout, when its
    contribute changed that layout (FLUX.1's packing: runtime/denoiser/flux.py)."""
    def contribute(self, feed: dict[str, torch.Tensor], step: UnetStep) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class TextContributor:
    """encoder_hidden_states, and SDXL's pooled text_embeds and time_ids when the UNet takes them."""
    cond: Conditioning
    added: bool

    def contribute(self, feed, step):
        feed = feed | {"encoder_hidden_states": self.cond.embeds}
        if self.added:
            feed |= {"text_embeds": self.cond.pooled, "time_ids": self.cond.time_ids}
        return feed


@dataclass(frozen=True)
class ExtraChannels:
    """Channels concatenated after the latents (9-channel inpainting: mask ‖ masked-image latents), already
    guidance-batched: [B(·2), C, h, w]."""
    channels: torch.Tensor

    def contribute(self, feed, step):
        return feed | {"sample": torch.cat([feed["sample"], self.channels], dim=1)}


@dataclass(frozen=True)
class ClassLabels:
    """The UNet's class_labels input (the ×4 upscaler's noise level), already guidance-batched: int64 [B(·2)]."""
    labels: torch.Tensor

    def contribute(self, feed, step):
        return feed | {"class_labels": self.labels}


class UnetCall:
    """`call(scaled_x, t) -> guided output` for make_denoiser, over one UNet engine and its contributors."""

    def __init__(self, engine, guidance: Guidance, contributors: Sequence[Contributor], timesteps: Sequence[float],
                 output: str = "out_sample"):
        self.engine = engine
        self.output = output  # the engine output read (Layout.output: out_hidden_states for the transformers)
        self.guidance = guidance
        self.contributors = tuple(contributors)
        self.timestep_rank = len(engine.inputs["timestep"].shape)
        self.index = {}
        for i, t in enumerate(timesteps):
            self.index.setdefault(float(t), i)
        self.count = len(timesteps)

    def __call__(self, scaled_x: torch.Tensor, t: float) -> torch.Tensor:
        x_in = self.guidance.batch(scaled_x)
        step = UnetStep(self.index.get(float(t), 0), self.count, float(t), x_in)
        timestep = torch.tensor(float(t), dtype=torch.float32)
        if self.timestep_rank == 1:  # older exports: [batch]
            timestep = timestep.reshape(1).expand(x_in.shape[0])
        inputs = {"sample": x_in, "timestep": timestep}
        for c in self.contributors:
            inputs = c.contribute(inputs, step)
        out = feed_mod.run(self.engine, **inputs)[self.output]
        for c in self.contributors:  # a contributor that reshaped the latent input gives the output its layout back
            if hasattr(c, "restore"):
                out = c.restore(out, step)
        return self.guidance.combine(out)
