"""What tasks and conditioning kinds work with: one engine directory's engines (opened on first use), tokenizers,
LoRA engine sets and textual inversions, and the VAE and noise operations every task shares (DESIGN.md §2a).

`Pipeline` (runtime/pipeline.py) is these components plus the step loop; tasks (runtime/tasks/) and kinds
(runtime/conditioning/) are written against this class and import nothing above it, so they cannot reach the loop.
Randomness is drawn per image (DESIGN.md §4a): image i of a request seeded s has its own CPU torch.Generator seeded
s + i, used in the order and shapes diffusers uses with a list of generators.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from PIL import Image

from sdrt.runtime import image_io, vae_tiling
from sdrt.runtime.denoiser import feed
from sdrt.runtime.errors import UserError
from sdrt.runtime.family import Family
from sdrt.runtime.job import TINY_VAE, Job
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import EngineDir
from sdrt.runtime.lora import adapters as lora_adapters
from sdrt.runtime.prompts.encode import TextSetup
from sdrt.runtime.samplers import noise


class Components:
    def __init__(self, engine_dir: EngineDir, engines: dict, tokenizers: dict, limits: Limits = Limits()):
        self.dir = engine_dir
        self.engines = engines
        self.tokenizers = tokenizers
        self.limits = limits
        self.device = getattr(engines[engine_dir.info.layout.denoiser], "device", "cpu")  # where latents live
        self.adapters = lora_adapters.Adapters(engine_dir, lambda: self.engines)  # engines per LoRA set, from base weights
        self.text = TextSetup()  # embeddings and the text encoders' inputs_embeds variants (runtime/prompts/encode.py)
        self.vae_tiles = vae_tiling.Tiles.of_vae(engine_dir.vae_config)  # diffusers' defaults for this VAE
        self.open_engine: Callable | None = None  # path → engine, for components opened on first use (set by load)

    def component(self, name: str):
        """The engine of `name`, opened on first use (components plain runs never need, such as ControlNets)."""
        if name not in self.engines:
            if self.open_engine is None:
                raise UserError(f"this pipeline was built without {name} and cannot open it")
            self.engines[name] = self.open_engine(self.dir.onnx_path(name))
        return self.engines[name]

    def engine(self, name: str, job: Job | None = None):
        """Component `name`'s engine for this job's LoRA set (runtime/lora/adapters.py: rebuilt, never accumulated)."""
        self.component(name)
        return self.adapters.engine(name, job.loras if job is not None else ())

    def lazy_engine(self, name: str):
        """Step caching's graphs, opened on first use (only runs that use them pay); they carry no LoRA weights."""
        if name not in self.engines and self.adapters.base:
            raise UserError("step caching's graphs carry no LoRA weights; this pipeline was loaded with LoRAs")
        return self.component(name)

    # ---- noise and the VAE ----------------------------------------------------------------------------------
    def randn(self, shape: tuple, generators: list) -> torch.Tensor:
        """diffusers' randn_tensor with a list of CPU generators: one draw per image, then moved to the device."""
        return noise.randn(shape, generators, self.device)

    def encode_image(self, image: torch.Tensor, generators: list, vae: str = "full",
                     tiled: bool = False) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] → scaled latents [N, 4, h, w]: the posterior sampled once per image, each with
        its own generator (diffusers' img2img with a list of generators: retrieve_latents(..., generator[i])).
        The tiny VAE's encoder gives latents, not a distribution: retrieve_latents draws nothing for it."""
        if vae == "tiny":
            latents = feed.run(self.component(TINY_VAE["encode"]), sample=image)["latents"]
            latents = latents.repeat_interleave(len(generators), dim=0) - self.shift_factor(TINY_VAE["encode"])
            return latents * self.scaling_factor(TINY_VAE["encode"])
        encoder = self.component("vae_encoder")
        if tiled and self.vae_tiles.encode_tiles(*image.shape[-2:]):  # AutoencoderKL._tiled_encode
            params = vae_tiling.tiled_encode(lambda x: feed.run(encoder, sample=x)["latent_parameters"], image,
                                             self.vae_tiles)
        else:
            params = feed.run(encoder, sample=image)["latent_parameters"]
        mean, logvar = params.chunk(2, dim=1)  # diffusers DiagonalGaussianDistribution
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = noise.randn((len(generators), *mean.shape[1:]), generators, mean.device, mean.dtype)
        latents = mean + std * eps
        stats = self.latents_stats("vae_encoder")
        if stats is not None:  # StableDiffusionXLImg2ImgPipeline.prepare_latents
            return (latents - stats[0]) * float(self.dir.vae_config.get("scaling_factor", 0.18215)) / stats[1]
        # SD3/Flux: (z - shift_factor)·scaling_factor (StableDiffusion3Img2ImgPipeline._encode_vae_image)
        return (latents - self.shift_factor("vae_encoder")) * float(self.dir.vae_config.get("scaling_factor", 0.18215))

    def decode(self, latents: torch.Tensor, vae: str = "full", tiled: bool = False) -> list[Image.Image]:
        """Latents → images with the full VAE or the tiny one (vae="tiny": export/extras/tiny_vae.py, whose
        scaling_factor 1.0 makes this diffusers' `vae.decode(latents / vae.config.scaling_factor)` as well);
        `tiled`: the full VAE in tiles, as diffusers after vae.enable_tiling() (runtime/vae_tiling.py)."""
        name = TINY_VAE["decode"] if vae == "tiny" else "vae_decoder"
        engine = self.component(name)
        stats = self.latents_stats(name)
        scaled = latents / self.scaling_factor(name) if stats is None else \
            latents * stats[1] / self.scaling_factor(name) + stats[0]  # StableDiffusionXLPipeline.__call__'s decode
        scaled = scaled + self.shift_factor(name)  # SD3/Flux: latents / scaling_factor + shift_factor
        if tiled and vae != "tiny" and self.vae_tiles.decode_tiles(*scaled.shape[-2:]):
            out = vae_tiling.tiled_decode(lambda z: feed.run(engine, latent_sample=z)["sample"], scaled,
                                          self.vae_tiles)
        else:
            out = feed.run(engine, latent_sample=scaled)["sample"]
        return image_io.to_pil(out, fp16_vae=engine.inputs["latent_sample"].dtype == "float16")

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Progress images: a step's latents decoded by the tiny VAE (needs vae_decoder_tiny)."""
        return self.decode(latents, "tiny")

    def latents_stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's per-channel latents_mean / latents_std ([1, C, 1, 1] float32: Playground v2.5's VAE), which
        diffusers' SDXL pipelines apply around the scaling factor (its SD 1.x/2.x pipelines never read them)."""
        if name not in ("vae_decoder", "vae_encoder") or self.dir.info.family not in (Family.SDXL, Family.SDXL_REFINER):
            return None
        mean, std = self.dir.vae_config.get("latents_mean"), self.dir.vae_config.get("latents_std")
        if mean is None or std is None:
            return None
        return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def shift_factor(self, name: str) -> float:
        """SD3/Flux pipelines shift latents by the decoding (or encoding) VAE's own shift_factor, the tiny one's
        when a TAESD3/TAEF1 stands in (pipe.vae swapped: its config is the one read); 0 for the UNet families."""
        if not self.dir.info.layout.vae_shift:
            return 0.0
        config = self.dir.vae_config if name in ("vae_decoder", "vae_encoder") else \
            json.loads((self.dir.path / name / "config.json").read_text())
        return float(config.get("shift_factor") or 0.0)

    def scaling_factor(self, name: str) -> float:
        config = self.dir.vae_config if name in ("vae_decoder", "vae_encoder") else \
            json.loads((self.dir.path / name / "config.json").read_text())
        return float(config.get("scaling_factor", 0.18215))
