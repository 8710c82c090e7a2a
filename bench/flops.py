"""FLOPs per component, computed, and the machine's matmul peak measured in the same run.

FLOPs follow reference/fewstep_perf.md §2.3 / §9.1: 2×MAC of matmul, convolution and attention (aten mm,
addmm, bmm, convolution, scaled-dot-product attention) as torch.utils.flop_counter.FlopCounterMode counts
them; norms, activations and softmax are left out. The modules are the diffusers/transformers classes built
on the meta device from the engine directory's own config.json files (no weights, no memory), run once at
batch 1 at the scenario's latent size. Counts are linear in batch, so a call at batch B costs B × these.
Checked against §2.3: SD1.5 UNet at 64² latents 803.3 GFLOPs, VAE decoder at 512² 2514.5 GFLOPs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

METHOD = ("2×MAC of matmul/conv/attention (aten mm, addmm, bmm, convolution, SDPA) counted by "
          "torch.utils.flop_counter.FlopCounterMode on meta-device modules built from the engine directory's "
          "configs, per image (batch 1, 77 CLIP tokens; T5: 256 for SD3, 512 for FLUX.1); norms, activations, softmax excluded. The diffusers model's "
          "count, used for every backend: sdrt's exported upsamplers execute 4 taps instead of 9, so its GFLOP/s "
          "are effective rates (python -m sdrt.bench.experiments.op_profile counts the FLOPs its graphs execute)")
TOKENS = 77
T5_TOKENS = {"sd3": 256, "flux": 512}  # the T5 length each family's pipeline pads prompts to by default
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


@dataclass(frozen=True)
class ModelConfigs:
    """config.json of each component, as an engine directory (or a diffusers folder) holds them."""

    unet: dict  # the denoiser's config: the UNet's, or SD3's / FLUX.1's transformer's (`denoiser` says which)
    vae: dict
    text_encoders: dict  # name → transformers CLIPTextConfig (or T5Config) dict
    vae_tiny: dict | None = None  # the AutoencoderTiny beside the VAE (export/extras/tiny_vae.py), when exported
    denoiser: str = "unet"  # unet | transformer
    family: str = "sd15"  # the manifest's (sd3 / flux read their text lengths from it)

    @classmethod
    def from_engine_dir(cls, engine_dir: Path) -> "ModelConfigs":
        engine_dir = Path(engine_dir)
        encoders = {name: _read(engine_dir / name / "config.json")
                    for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                    if (engine_dir / name / "config.json").is_file()}
        denoiser = "transformer" if (engine_dir / "transformer" / "config.json").is_file() else "unet"
        manifest = engine_dir / "manifest.json"
        return cls(unet=_read(engine_dir / denoiser / "config.json"),
                   vae=_read(engine_dir / "vae_decoder" / "config.json"), text_encoders=encoders,
                   vae_tiny=_read(tiny) if (tiny := engine_dir / "vae_decoder_tiny" / "config.json").is_file() else None,
                   denoiser=denoiser, family=_read(manifest)["family"] if manifest.is_file() else "sd15")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _essential(config: dict) -> dict:
    """The config without paths and version stamps, so the same architecture hashes the same anywhere."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("transformers_version",)}


def cache_key(component: str, config: dict, latent_hw: tuple[int, int], extra: dict | None = None) -> str:
    text = json.dumps([component, _essential(config), list(latent_hw), extra or {}], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _count(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def text_encoder_flops(config: dict, tokens: int = TOKENS) -> int:
    """One prompt of 77 tokens through CLIPTextModel(WithProjection), or of `tokens` through T5EncoderModel."""
    import torch
    import transformers

    if config.get("model_type") == "t5":
        with torch.device("meta"):
            t5 = transformers.T5EncoderModel(transformers.T5Config.from_dict(_essential(config))).eval()
            ids = torch.zeros(1, tokens, dtype=torch.long)
        return _count(lambda: t5(ids))

    cls_name = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = getattr(transformers, cls_name if cls_name.startswith("CLIPTextModel") else "CLIPTextModel")
    with torch.device("meta"):
        model = cls(transformers.CLIPTextConfig.from_dict(_essential(config))).eval()
        ids = torch.zeros(1, TOKENS, dtype=torch.long)
    return _count(lambda: model(ids, output_hidden_states=True))


def unet_flops(config: dict, latent_hw: tuple[int, int], text_embeds_dim: int | None) -> int:
    """One UNet evaluation of one latent [1, C, h, w] with 77 context tokens (SDXL: plus text_embeds/time_ids)."""
    import diffusers
    import torch

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(_essential(config)).eval()
        sample = torch.zeros(1, config.get("in_channels", 4), *latent_hw)
        context = torch.zeros(1, TOKENS, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            # projection_class_embeddings_input_dim = text_embeds ‖ fourier(time_ids) (5 refiner / 6 base ids)
            time_ids = (config["projection_class_embeddings_input_dim"] - text_embeds_dim) // config["addition_time_embed_dim"]
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, text_embeds_dim),
                                           "time_ids": torch.zeros(1, time_ids)}}
        timestep = torch.tensor(999.0)
    return _count(lambda: unet(sample, timestep, context, **extra))


def transformer_flops(config: dict, latent_hw: tuple[int, int], family: str, t5_tokens: int) -> int:
    """One transformer evaluation of one latent [1, C, h, w]: SD3 with CLIP's 77 ‖ T5's tokens of context, FLUX.1
    on the 2×2-packed latent sequence with T5's tokens (runtime/denoiser/flux.py)."""
    import diffusers
    import torch

    h, w = latent_hw
    with torch.device("meta"):
        if family == "flux":
            model = diffusers.FluxTransformer2DModel.from_config(_essential(config)).eval()
            seq = (h // 2) * (w // 2)
            feed = dict(hidden_states=torch.zeros(1, seq, config["in_channels"]),
                        encoder_hidden_states=torch.zeros(1, t5_tokens, config["joint_attention_dim"]),
                        pooled_projections=torch.zeros(1, config["pooled_projection_dim"]),
                        timestep=torch.ones(1), img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(t5_tokens, 3),
                        guidance=torch.ones(1) if config.get("guidance_embeds") else None)
        else:
            model = diffusers.SD3Transformer2DModel.from_config(_essential(config)).eval()
            feed = dict(hidden_states=torch.zeros(1, config["in_channels"], h, w),
                        encoder_hidden_states=torch.zeros(1, TOKENS + t5_tokens, config["joint_attention_dim"]),
                        pooled_projections=torch.zeros(1, config["pooled_projection_dim"]), timestep=torch.ones(1))
    return _count(lambda: model(**feed))


def vae_decoder_flops(config: dict, latent_hw: tuple[int, int]) -> int:
    """AutoencoderKL.decode (post_quant_conv + decoder) of one latent [1, 4, h, w]."""
    import diffusers
    import torch

    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config(_essential(config)).eval()
        latent = torch.zeros(1, config.get("latent_channels", 4), *latent_hw)
    return _count(lambda: vae.decode(latent))


def tiny_vae_decoder_flops(config: dict, latent_hw: tuple[int, int]) -> int:
    """AutoencoderTiny.decode (DecoderTiny) of one latent [1, 4, h, w]."""
    import diffusers
    import torch

    with torch.device("meta"):
        vae = diffusers.AutoencoderTiny.from_config(_essential(config)).eval()
        latent = torch.zeros(1, config.get("latent_channels", 4), *latent_hw)
    return _count(lambda: vae.decode(latent))


def per_image_flops(configs: ModelConfigs, latent_hw: tuple[int, int], cache_file: Path | None = None) -> dict[str, int]:
    """component → FLOPs of one call at batch 1 at this latent size, read from / added to `cache_file`."""
    cache = _read(cache_file) if cache_file is not None and Path(cache_file).is_file() else {}
    te2 = configs.text_encoders.get("text_encoder_2", {})
    text_embeds_dim = te2.get("projection_dim")
    t5_tokens = T5_TOKENS.get(configs.family, TOKENS)
    jobs = {name: (cfg, (0, 0), {"tokens": t5_tokens} if cfg.get("model_type") == "t5" else None,
                   lambda cfg=cfg: text_encoder_flops(cfg, t5_tokens)) for name, cfg in configs.text_encoders.items()}
    if configs.denoiser == "transformer":
        jobs["transformer"] = (configs.unet, latent_hw, {"family": configs.family, "tokens": t5_tokens},
                               lambda: transformer_flops(configs.unet, latent_hw, configs.family, t5_tokens))
    else:
        jobs["unet"] = (configs.unet, latent_hw, {"text_embeds": text_embeds_dim},
                        lambda: unet_flops(configs.unet, latent_hw, text_embeds_dim))
    jobs["vae_decoder"] = (configs.vae, latent_hw, None, lambda: vae_decoder_flops(configs.vae, latent_hw))
    if configs.vae_tiny is not None:
        jobs["vae_decoder_tiny"] = (configs.vae_tiny, latent_hw, None,
                                    lambda: tiny_vae_decoder_flops(configs.vae_tiny, latent_hw))
    out: dict[str, int] = {}
    for name, (cfg, hw, extra, count) in jobs.items():
        key = cache_key(name, cfg, hw, extra)
        if key not in cache:
            cache[key] = count()
        out[name] = int(cache[key])
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(cache, indent=1, sort_keys=True))
    return out


# ---- the machine's limit -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    flops_per_second: float  # best of the repeats
    what: str
    seconds: tuple[float, ...]  # each timed matmul

    def as_dict(self) -> dict:
        return {"flops_per_second": self.flops_per_second, "what": self.what, "seconds": list(self.seconds)}


def measure_peak(threads: int, gpu: bool = False, precision: str = "fp32", size: int = 2048,
                 min_seconds: float = 1.0, min_repeats: int = 3) -> Peak:
    """Dense matmul throughput, the best repeat of the best library. CPU: fp32 [size, size] @ [size, size] with
    `threads` threads, through torch and through ONNX Runtime's MatMul (MLAS, what ort-cpu runs; it can beat
    torch's GEMM); GPU: the scenario's precision at ≥ 8192² (CUDA events)."""
    if gpu:
        return _gpu_peak(precision, max(size, 8192), min_seconds, min_repeats)
    probes = [_torch_cpu_matmul(threads, size), _ort_cpu_matmul(threads, size)]
    return max((_best_of(fn, 2 * size**3, what, min_seconds, min_repeats) for fn, what in probes if fn is not None),
               key=lambda p: p.flops_per_second)


def _best_of(fn, flops: int, what: str, min_seconds: float, min_repeats: int) -> Peak:
    fn()  # warm-up: thread pool and caches
    seconds: list[float] = []
    started = time.perf_counter()
    while len(seconds) < min_repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return Peak(flops / min(seconds), f"{what}, best of {len(seconds)}", tuple(seconds))


def _torch_cpu_matmul(threads: int, size: int):
    import torch

    torch.set_num_threads(threads)
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    return (lambda: torch.mm(a, b, out=out)), f"torch fp32 matmul {size}x{size} @ {size}x{size}, {threads} threads"


def _ort_cpu_matmul(threads: int, size: int):
    """A one-node ONNX graph, MatMul [size, size] @ [size, size]; (None, "") without onnx."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None, ""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b", "y")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "peak", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)  # readable by older ONNX Runtime releases too
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.rand(size, size).astype(np.float32), "b": np.random.rand(size, size).astype(np.float32)}
    return (lambda: session.run(None, feed)), f"ONNX Runtime fp32 MatMul {size}x{size} @ {size}x{size}, " \
                                              f"{threads} intra-op threads"


def _gpu_peak(precision: str, size: int, min_seconds: float, min_repeats: int) -> Peak:
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.float32
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    torch.mm(a, b)
    torch.cuda.synchronize()
    seconds: list[float] = []
    started = time.perf_counter()
    while len(seconds) < min_repeats or time.perf_counter() - started < min_seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    tf32 = "" if dtype == torch.float16 else f" (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
    return Peak(2 * size**3 / min(seconds), f"torch {precision} matmul {size}x{size} on "
                                            f"{torch.cuda.get_device_name()}{tf32}, best of {len(seconds)}",
                tuple(seconds))
