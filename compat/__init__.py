"""diffusers-style pipeline over sdrt's runtime: `from sdrt.compat import DiffusionPipeline` (compat/pipeline.py)."""

from sdrt.compat.pipeline import DiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["DiffusionPipeline", "StableDiffusionPipelineOutput"]
