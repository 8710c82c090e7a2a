"""`DiffusionPipeline`: diffusers' pipeline call over sdrt's runtime, so diffusers code switches by changing the import.

    from sdrt.compat import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("engines/sd15", backend="onnxruntime")
    image = pipe("a cat", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]

One class serves text-to-image, img2img (`image`) and inpainting (`image` + `mask_image`), each as diffusers'
StableDiffusion(XL)Pipeline / Img2ImgPipeline / InpaintPipeline (0.42) would: prompts read as plain text (no
AUTOMATIC1111 weighting), randomness drawn from the caller's generators as diffusers draws it (DiffusersDraws below),
the scheduler chosen by assigning a diffusers scheduler (compat/scheduler.py), LoRAs and textual inversions through
diffusers' loader methods (compat/adapters.py). An argument of diffusers' call sdrt does not do raises a TypeError or
ValueError naming it; none is ignored. diffusers itself is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdrt.compat.adapters import AdapterMixin
from sdrt.compat.scheduler import SchedulerView, model_view, select
from sdrt.runtime.errors import UserError
from sdrt.runtime.family import Family
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Adapters, ImageInputs, Prompt, Request, Sampling, Size

# sdrt's request field → the diffusers argument that set it (for error messages)
_ARGUMENT = {"steps": "num_inference_steps", "guidance": "guidance_scale", "batch": "num_images_per_prompt",
             "init_image": "image", "mask": "mask_image", "sampler": "scheduler", "schedule": "scheduler",
             "timestep_spacing": "scheduler", "prediction_type": "scheduler", "loras": "LoRA adapters",
             "embeddings": "textual inversion"}
# diffusers' call arguments sdrt does not take, and what to do instead
_INSTEAD = {
    "prompt_embeds": "pass the prompt text", "negative_prompt_embeds": "pass the negative prompt text",
    "pooled_prompt_embeds": "pass the prompt text", "negative_pooled_prompt_embeds": "pass the negative prompt text",
    "prompt_2": "SDXL's second prompt is the first one here", "negative_prompt_2": "use negative_prompt",
    "ip_adapter_image": "use sdrt's Request(image_prompt=...) with runtime.pipeline.Pipeline",
    "timesteps": "choose the scheduler instead", "sigmas": "choose the scheduler instead",
    "callback": "use callback_on_step_end", "callback_steps": "use callback_on_step_end",
}
# diffusers 0.42's __call__ defaults: (guidance_scale, strength) per family and task (pipeline_stable_diffusion*.py,
# pipeline_stable_diffusion_xl*.py)
_DEFAULTS = {("sd", "txt2img"): (7.5, None), ("sd", "img2img"): (7.5, 0.8), ("sd", "inpaint"): (7.5, 1.0),
             ("sdxl", "txt2img"): (5.0, None), ("sdxl", "img2img"): (5.0, 0.3), ("sdxl", "inpaint"): (7.5, 0.9999)}
_BACKEND_ALIASES = {"onnxruntime": ("ort-cuda", "ort-cpu"), "ort": ("ort-cuda", "ort-cpu")}


# ---- randomness, drawn as diffusers' pipelines draw it from the caller's `generator` ----
# sdrt's own convention is one generator per image, seeded s + i (DESIGN.md §4a). diffusers' pipelines take whatever
# the caller passes (diffusers 0.42, pipelines/stable_diffusion*/ and utils/torch_utils.py `randn_tensor`):
# - one torch.Generator (or None: torch's global RNG) is drawn from for the whole batch: the initial noise as one
#   randn of the full batch shape (`prepare_latents`), each scheduler step's noise likewise;
# - a list gives image i its own generator for every draw;
# - the init image's VAE posterior (img2img, inpainting) is sampled ONCE for the one image with the one generator and
#   repeated over the batch; with a list, img2img samples it per image with generator[i] (the image repeated), while
#   inpainting's `_encode_vae_image` loops over the image's own batch of one and so uses generator[0] only;
# - `latents`, where the pipeline takes them, replace the initial noise draw.
# sdrt's noise helpers (runtime/samplers/noise.py) and samplers already take one generator or a list; this class hands
# them the caller's and changes only the posterior's draw and the initial noise.

@dataclass(frozen=True)
class Draws:
    """One call's randomness: the caller's generator(s) and latents, and the batch size."""

    generator: object  # None | torch.Generator | list of them (one per image)
    count: int  # images in the batch
    latents: torch.Tensor | None = None  # the initial noise, drawn by the caller
    inpaint: bool = False  # posterior draws from generator[0] only (diffusers' _encode_vae_image)


class DiffusersDraws(Pipeline):
    """A Pipeline whose `draws` (set for one call) decide every random draw, as diffusers' pipelines make them."""

    draws: Draws | None = None

    def _common(self, job):
        common = super()._common(job)
        if self.draws is not None:
            common.generator = self.draws.generator  # the samplers draw from it, one or a list, as diffusers
        return common

    def randn(self, shape: tuple, generators) -> torch.Tensor:
        latents = self.draws.latents if self.draws is not None else None
        if latents is None:
            return super().randn(shape, generators)
        if tuple(latents.shape) != tuple(shape):
            f = self.dir.vae_scale_factor
            raise ValueError(f"latents: expected shape {list(shape)} (images, channels, height / {f}, width / {f}), "
                             f"got {list(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def encode_image(self, image: torch.Tensor, generators, vae: str = "full", tiled: bool = False) -> torch.Tensor:
        d = self.draws
        if d is None or (isinstance(generators, list) and not d.inpaint):
            return super().encode_image(image, generators, vae, tiled)  # img2img with a list: generator[i] each
        first = generators[0] if isinstance(generators, list) else generators
        latents = super().encode_image(image, [first], vae, tiled)  # one posterior sample, then repeated
        return latents.repeat(d.count, 1, 1, 1)


@dataclass
class StableDiffusionPipelineOutput:
    images: Any  # a list of PIL images, an [N, H, W, 3] float array in [0, 1] ("np"), or the latents tensor
    nsfw_content_detected: Any = None  # sdrt has no safety checker


class DiffusionPipeline(AdapterMixin):
    def __init__(self, runtime: DiffusersDraws, backend: str):
        self._runtime, self.backend = runtime, backend
        self._scheduler = model_view(runtime.dir.scheduler_config)
        self._interrupt = False
        self._init_adapters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, backend: str = "auto", torch_dtype=None,
                        safety_checker=None, **kwargs) -> "DiffusionPipeline":
        """An sdrt engine directory (`sdrt export MODEL -o DIR`), not a diffusers folder. `backend`: auto, tensorrt,
        ort-cuda, ort-cpu, torch, or onnxruntime (ort-cuda where it runs, else ort-cpu)."""
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:
            raise TypeError(f"from_pretrained: sdrt does not support {', '.join(given)} (the engine directory "
                            "fixed the model's parts and precision at export)")
        if safety_checker is not None:
            raise ValueError("safety_checker: sdrt runs no safety checker; pass None or leave it out")
        if backend in _BACKEND_ALIASES:
            from sdrt.engines.ort import available_backends

            backend = next(b for b in _BACKEND_ALIASES[backend] if b in available_backends())
        try:
            runtime = DiffusersDraws.load(Path(pretrained_model_name_or_path), backend=backend)
        except UserError as e:
            raise ValueError(str(e)) from None
        precision = (runtime.dir.manifest or {}).get("precision", "fp32")
        if torch_dtype is not None and torch_dtype != {"fp16": torch.float16}.get(precision, torch.float32):
            raise ValueError(f"torch_dtype: this engine directory was exported in {precision}; export it again in "
                             "the precision you want, or leave torch_dtype out")
        return cls(runtime, backend)

    # ---- what diffusers code touches besides the call ----
    @property
    def scheduler(self) -> SchedulerView:
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self._scheduler = select(scheduler, self._runtime.dir.scheduler_config)

    @property
    def device(self) -> torch.device:
        return torch.device(self._runtime.device)

    @property
    def interrupt(self) -> bool:  # a step callback sets pipe._interrupt = True to stop, as in diffusers
        return self._interrupt

    def to(self, device=None, dtype=None):
        if dtype is not None or isinstance(device, torch.dtype):
            raise TypeError("to: the precision is fixed by the engine directory; export it again to change it")
        if device is not None and torch.device(device).type != self.device.type:
            raise ValueError(f"to: this pipeline runs on {self.device} (backend {self.backend}); choose the device "
                             "with from_pretrained(..., backend=...)")
        return self

    def set_progress_bar_config(self, disable: bool = True, **kwargs) -> None:
        """sdrt's pipeline draws no progress bar; `disable=True` is what it already does."""
        if not disable or kwargs:
            raise TypeError("set_progress_bar_config: sdrt's DiffusionPipeline draws no progress bar")

    # ---- the call ----
    def __call__(self, prompt=None, *, image=None, mask_image=None, strength=None, height=None, width=None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, negative_prompt=None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs=None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **kwargs):
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:
            raise TypeError("; ".join(f"{k}: not supported by sdrt's DiffusionPipeline" +
                                      (f" ({_INSTEAD[k]})" if k in _INSTEAD else "") for k in given))
        if prompt is None:
            raise ValueError("prompt: required (a string or a list of strings)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) * num_images_per_prompt if isinstance(num_images_per_prompt, int) else 0
        if eta:
            raise ValueError(f"eta: sdrt's samplers run at diffusers' default eta 0 (got {eta})")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type: one of 'pil', 'np', 'latent' (got {output_type!r})")
        extra = dict(cross_attention_kwargs or {})
        lora_scale = float(extra.pop("scale", 1.0))
        if extra:
            raise ValueError(f"cross_attention_kwargs: only 'scale' (the LoRA scale) is supported, not "
                             f"{', '.join(map(repr, extra))}")
        inputs = getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs)
        if set(inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs: sdrt hands callbacks 'latents' only, not "
                             f"{', '.join(sorted(set(inputs) - {'latents'}))}")
        _check_generator(generator, count)
        image, mask_image = _one_image("image", image), _one_image("mask_image", mask_image)
        if image is None and strength is not None:
            raise ValueError("strength: applies to img2img and inpainting; give an image")
        if latents is not None and image is not None and (mask_image is None or (strength or 1.0) < 1.0):
            raise ValueError("latents: diffusers takes them for text-to-image and full-strength inpainting only")
        sdxl = self._runtime.dir.info.family in (Family.SDXL, Family.SDXL_REFINER)
        task = "txt2img" if image is None else "img2img" if mask_image is None else "inpaint"
        default_guidance, default_strength = _DEFAULTS["sdxl" if sdxl else "sd", task]
        guidance_scale = default_guidance if guidance_scale is None else guidance_scale
        strength = default_strength if strength is None else strength
        negative = negative_prompt if negative_prompt is None or isinstance(negative_prompt, str) \
            else tuple(negative_prompt)
        request = Request(
            prompt=Prompt(text=tuple(prompts), negative=negative, syntax="plain", clip_skip=clip_skip or 0,
                          embeddings=tuple(self._embeddings)),
            sampling=Sampling(steps=num_inference_steps, guidance=guidance_scale, guidance_rescale=guidance_rescale,
                              sampler=self._scheduler.sampler, schedule=self._scheduler.schedule,
                              timestep_spacing=self._scheduler.timestep_spacing,
                              prediction_type=self._scheduler.prediction_type),
            size=Size(width=width, height=height, batch=num_images_per_prompt),
            images=ImageInputs(init_image=image, strength=strength, mask=mask_image),
            adapters=Adapters(loras=self._request_loras(lora_scale)))
        rt = self._runtime
        try:
            job = rt.validate(request)
            rt.draws = Draws(generator, job.count, latents, inpaint=mask_image is not None)
            final = self._denoise(job, rt.prepare(job), callback_on_step_end)
            images = final if output_type == "latent" else rt.finish(job, rt.decode(final, job.vae, job.tile_vae))
        except InvalidRequest as e:
            raise ValueError(f"{_ARGUMENT.get(e.field, e.field)}: {e.message}") from None
        except UserError as e:
            raise ValueError(str(e)) from None
        finally:
            rt.draws = None
        if output_type == "np":
            images = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32) / 255.0
        return StableDiffusionPipelineOutput(images) if return_dict else (images, None)

    def _denoise(self, job, prep, callback) -> torch.Tensor:
        """The step loop; after each step the callback sees (and may replace) the latents as diffusers holds them."""
        steps = self._runtime.steps(job, prep)
        x, i, self._interrupt = next(steps, None), 0, False
        if x is None:
            raise ValueError(f"num_inference_steps: {job.steps} steps at this strength leave no denoising step")
        while True:
            sent = None
            if callback is not None:
                sigma = float(prep.schedule.sigmas[i + 1])
                t = torch.tensor(float(prep.schedule.timesteps[i]))
                out = callback(self, i, t, {"latents": self._scheduler.to_diffusers_latents(x, sigma)}) or {}
                if out.get("latents") is not None:
                    x = sent = self._scheduler.from_diffusers_latents(out["latents"].float(), sigma)
            if self._interrupt:  # diffusers skips the remaining steps and decodes the latents it holds
                steps.close()
                return self._scheduler.to_diffusers_latents(x, float(prep.schedule.sigmas[i + 1]))
            try:
                x, i = steps.send(sent), i + 1
            except StopIteration:
                return x


def _check_generator(generator, count: int) -> None:
    gens = generator if isinstance(generator, list) else [generator] if generator is not None else []
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError("generator: a torch.Generator or a list of them")
    if any(g.device.type != "cpu" for g in gens):
        raise ValueError("generator: sdrt draws on the CPU; pass torch.Generator() (device 'cpu')")
    if isinstance(generator, list) and len(generator) != count:
        raise ValueError(f"generator: a list of {len(generator)} generators for {count} images; give one per image")


def _one_image(name: str, image):
    if isinstance(image, (list, tuple)) and len(image) == 1:
        image = image[0]
    if image is not None and not isinstance(image, Image.Image):
        raise TypeError(f"{name}: sdrt takes one PIL image (not {type(image).__name__}, or a batch of them)")
    return image
