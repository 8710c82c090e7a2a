"""A TAEF1/TAESD3-like tiny VAE on the flow families: exported with `--tiny-vae` and decoding with `vae="tiny"` as
diffusers does with `pipe.vae = AutoencoderTiny(...)` — the pipeline then scales and shifts by the tiny VAE's own
config (`latents / scaling_factor + shift_factor`), which the test sets away from 1 and 0 so ignoring it shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request

diffusers = pytest.importorskip("diffusers")

PROMPTS = ("a red fox in the snow", "a blue car")
SIZE = dict(height=48, width=32)
TINY = dict(latent_channels=16, scaling_factor=0.7, shift_factor=0.4)


@pytest.mark.slow
def test_flux_tiny_vae_equals_diffusers_with_autoencoder_tiny(tmp_path):
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.extras.tiny_vae import write_tiny_vae
    from sdrt.export.models.tiny_flow import write_tiny_flux

    folder = write_tiny_flux(tmp_path / "flux", "schnell")
    tiny = write_tiny_vae(tmp_path / "taef1", scale_factor=2, **TINY)
    engine = tmp_path / "engine"
    export(ExportConfig(model=str(folder), output=engine, precision="fp32", tiny_vae=str(tiny),
                        components=("text_encoder", "text_encoder_2", "transformer", "vae_decoder",
                                    "vae_decoder_tiny")))
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.vae = diffusers.AutoencoderTiny.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    theirs = (pipe(prompt=list(PROMPTS), num_inference_steps=4, output_type="np", **SIZE,
                   generator=[torch.Generator().manual_seed(7 + i) for i in range(2)]).images * 255).round().astype(int)
    ours_pipe = Pipeline.load(engine, backend="ort-cpu")
    request = dict(prompt=PROMPTS, steps=4, seed=7, **SIZE)
    ours = np.stack([np.asarray(im) for im in ours_pipe.generate(Request.of(vae="tiny", **request))]).astype(int)
    full = np.stack([np.asarray(im) for im in ours_pipe.generate(Request.of(**request))]).astype(int)
    worst = int(np.abs(ours - theirs).max())
    print(f"FLUX.1 schnell with a tiny VAE vs FluxPipeline + AutoencoderTiny: {worst}/255")
    assert worst <= 1
    assert int(np.abs(ours - full).max()) > 10  # the tiny VAE decodes, not the full one
