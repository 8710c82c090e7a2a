"""Step caching (DeepCache, branch 0) in the composed UNet call (runtime/denoiser/call.py).

Every `interval`-th step (index 0, interval, 2·interval, … of the job's schedule, as DeepCacheSDHelper counts from
the first UNet call) runs `unet_deepcache`, the whole UNet, which also returns the feature entering its last
layer; the steps between run `unet_deepcache_shallow` on that feature (export/extras/deepcache.py). The choice is the
feed's: the `CachedFeature` contributor adds `deep_feature` on cached steps, and `CachedUnet` (an Engine over the
two graphs) runs the shallow graph when the feed has it and keeps the full graph's feature otherwise.
Samplers that evaluate the UNet more than once per step (Heun, DPM2, DPM++ 2S) see their extra evaluations as
cached steps, which the diffusers helper's timestep lookup does not define either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SHALLOW = "unet_deepcache", "unet_deepcache_shallow"


@dataclass
class FeatureStore:
    value: torch.Tensor | None = None  # [B(·2), C₀, h, w] from the last full step


@dataclass(frozen=True)
class CachedFeature:
    """Contributor: on cached steps the feed gets the last full step's deep_feature."""
    store: FeatureStore
    interval: int

    def contribute(self, feed, step):
        if step.index % self.interval == 0 or self.store.value is None:
            return feed
        return feed | {"deep_feature": self.store.value}


class CachedUnet:
    """An Engine over the two graphs (inputs: their union, so feed casting works for either). Output buffers: the
    wrapped engines'; the full graph's deep_feature is kept until the next full step."""

    def __init__(self, full, shallow, store: FeatureStore):
        self.full, self.shallow, self.store = full, shallow, store
        self.inputs = {**full.inputs, **shallow.inputs}
        self.outputs = {"out_sample": full.outputs["out_sample"]}
        self.device = getattr(full, "device", "cpu")
        self.name = FULL

    def __call__(self, feed: dict) -> dict:
        if "deep_feature" in feed:
            return self.shallow({k: v for k, v in feed.items() if k in self.shallow.inputs})
        out = self.full(feed)
        self.store.value = out["deep_feature"]
        return {"out_sample": out["out_sample"]}


def setup(open_engine, interval: int, unet, contributors: list) -> tuple[object, list]:
    """(UNet engine, contributors) for a job: unchanged when interval ≤ 1; `open_engine(name)` gives a component."""
    if interval <= 1:
        return unet, contributors
    store = FeatureStore()
    return CachedUnet(open_engine(FULL), open_engine(SHALLOW), store), [*contributors, CachedFeature(store, interval)]
