"""`sdrt export`: a diffusers pipeline → an optimum-compatible ONNX engine directory with a manifest.

The directory appears whole or not at all: everything is written into a hidden sibling and renamed into
place at the end. A re-run reuses components whose export key and file hashes still match.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from sdrt.runtime.lora import files as lora_files, fuse as lora_fuse, weights as lora_weights
from sdrt.runtime.errors import UserError
from sdrt.runtime.family import Family, detect
from sdrt.runtime.loader import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from sdrt.runtime.prompts.encode import write_text_weights

from sdrt.export import flow_components as flow, gate
from sdrt.export.extras import tiny_vae
from sdrt.export.extras import controlnet as cn
from sdrt.export.extras import ip_adapter as ipa
from sdrt.export.extras import instantid as iid
from sdrt.export.extras import pulid
from sdrt.export.extras import photomaker as pm
from sdrt.export.extras import t2i_adapter as t2i
from sdrt.export.components import (COMPONENT_NAMES, EMBEDS, component_specs, gate_shapes, has_timestep_cond,
    unet_factor, vae_scale_factor)
from sdrt.export.load import load_pipeline, local_location, local_source_hash, sha256_of_file
from sdrt.export import reuse, tokenizer_files
from sdrt.export.onnx_export import TWO_GB, files_bytes, io_specs, run_passes, torch_to_onnx
from sdrt.export.extras import hypernetwork
from sdrt.export.weights_map import LORA_COMPONENTS, Mapper
from sdrt.export.rewrites import SKIP_SIZE_PASS, SUBPIXEL_PASS, subpixel_upsampling, upsamplers_sized

PRECISIONS = ("fp32", "fp16")
VAE_FP32_REASON = ("the VAE's config sets force_upcast (the SDXL VAE overflows in fp16 and decodes black "
                   "images); pass --vae with an fp16-safe VAE such as madebyollin/sdxl-vae-fp16-fix to get fp16")


T5_FP32_REASON = ("T5 overflows in fp16 (its feed-forward activations exceed fp16's range: black or NaN images; "
                  "reference/flow_models.md §2) and this export's fp16 T5 failed the parity gate, so it stays fp32")
DEPTH_FP32_REASON = ("the depth estimator stays fp32: it is small, runs once per request, and diffusers notes that "
                     "DPT-Hybrid's batch-norm layers are not fp16-safe")


class GateFailed(UserError):
    pass


@dataclass(frozen=True)
class ExportConfig:
    model: str
    output: Path
    precision: str = "fp16"
    components: tuple[str, ...] | None = None  # None: every component the pipeline has
    vae: str | None = None
    family: str | None = None  # for single files whose family cannot be inferred
    single_file_config: str | None = None  # diffusers folder/hub id with the configs for a single file
    force: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale): fused into the exported weights (runtime/lora/fuse.py)
    textual_inversion: bool = False  # also the text encoders' inputs_embeds variants (export/components.py)
    hypernetworks: tuple[tuple[str, float], ...] = ()  # (file, scale): AUTOMATIC1111 hypernetworks baked into the UNet
    tiny_vae: str | None = None  # an AutoencoderTiny folder/hub id: vae_{de,en}coder_tiny beside the full VAE
    deepcache: bool = False  # also the two UNet graphs step caching runs (export/extras/deepcache.py, branch 0)
    controlnets: tuple[str, ...] = ()  # "SRC[=NAME]": each its own component controlnet/NAME (export/extras/controlnet.py)
    ip_adapter: str | tuple[str, ...] | None = None  # IP-Adapter file(s) "SRC[=NAME]": image_encoder + unet_ip (export/extras/ip_adapter.py)
    image_encoder: str | None = None  # the adapter's CLIPVisionModelWithProjection folder
    t2i_adapters: tuple[str, ...] = ()  # "SRC[=NAME]": T2I-Adapters, components t2i_adapter/NAME (export/extras/t2i_adapter.py)
    instantid: str | None = None  # InstantID's folder (IdentityNet + its adapter: export/extras/instantid.py)
    pulid: str | None = None  # PuLID v1's file (the ID encoder + unet_pulid: export/extras/pulid.py)
    pulid_eva: str | None = None  # with pulid: EVA02-CLIP's checkpoint and facexlib's BiSeNet, PuLID's photo path
    pulid_parsing: str | None = None  # (pulid/eva, pulid/parsing: export/extras/pulid_eva.py)
    photomaker: str | None = None  # PhotoMaker v1/v2's file (ID encoder, fuse, LoRA: export/extras/photomaker.py)


Progress = Callable[[str, str], None]  # (component, status) → None; status: "start" | "exported" | "skipped"
# the packages whose versions a manifest records
EXPORTED_WITH = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy")


def versions(packages: tuple[str, ...] = EXPORTED_WITH, python: bool = False) -> dict[str, str]:
    """Installed versions of `packages` (those not installed left out), after Python's own with python=True: the
    provenance a manifest (the default packages) and a training record (export/models/shapes_train.py) note."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]} if python else {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _check_output(cfg: ExportConfig, source_sha: str) -> dict | None:
    """The existing manifest to resume from, or None; refuses an output that holds something else."""
    out = cfg.output
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another -o/--output")
    manifest = read_manifest(out) if (out / MANIFEST_NAME).exists() else None
    if cfg.force:
        return None
    if manifest is None:
        if any(out.iterdir()):
            raise UserError(f"{out} holds files that are not an sdrt engine directory; choose an empty or new "
                            "directory, or pass --force to replace it")
        return None
    if manifest["source"]["sha256"] != source_sha:
        raise UserError(f"{out} holds an export of another model ({manifest['source']['location']}); pass --force "
                        "to replace it or choose another directory")
    return manifest


def _clean_stale_temps(out: Path) -> None:
    """Remove temporary siblings left by exports that were killed (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.sdrt-tmp-*"):
        pid = int(tmp.name.rsplit("-", 1)[-1]) if tmp.name.rsplit("-", 1)[-1].isdigit() else 0
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            continue


def _write_pipeline_files(pipe, tmp: Path, names: list[str], precision: str = "fp32") -> None:
    """model_index.json, scheduler, tokenizers and a config.json per component, as optimum lays them out.

    Tokenizer folders are copied from the source when it is a folder (transformers 5 would save only
    tokenizer.json; the source's vocab.json/merges.txt are what other tools read); what a folder still lacks of
    those is derived from its tokenizer.json (export/tokenizer_files.py).
    """
    source_dir = Path(str(pipe.config.get("_name_or_path", "") or pipe.name_or_path or ""))
    (tmp / "model_index.json").write_text(json.dumps(_model_index(pipe), indent=2, default=str))
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    for name in ("depth_estimator", "image_encoder"):  # the image processor that feeds it, beside it
        if name in names and getattr(pipe, "feature_extractor", None) is not None:
            (tmp / name).mkdir(exist_ok=True)
            pipe.feature_extractor.save_pretrained(tmp / name)
    if getattr(pipe, "image_normalizer", None) is not None:  # unCLIP: the embedding's mean/std and noising schedule
        pipe.image_normalizer.save_pretrained(tmp / "image_normalizer", safe_serialization=True)
        pipe.image_noising_scheduler.save_pretrained(tmp / "image_noising_scheduler")
    if getattr(pipe, "low_res_scheduler", None) is not None:  # the ×4 upscaler noises its input with its own
        pipe.low_res_scheduler.save_pretrained(tmp / "low_res_scheduler")
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # tokenizer_3: SD3's T5 (tokenizer.json)
        if getattr(pipe, tok, None) is None:
            continue
        if source_dir.is_dir() and (source_dir / tok).is_dir():
            shutil.copytree(source_dir / tok, tmp / tok)
        else:
            getattr(pipe, tok).save_pretrained(tmp / tok)
        tokenizer_files.complete(tmp / tok)
    for name in names:
        folder = tmp / name
        folder.mkdir(exist_ok=True)
        module = _module_for(pipe, name)
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if name.startswith("text_encoder"):  # final layer norm (clip skip); the variants: the token table too
            write_text_weights(module, folder, table=name.endswith(EMBEDS), half=precision == "fp16")


def _vae_needs_fp32(pipe, info) -> bool:
    """SDXL pipelines upcast a force_upcast VAE (its fp16 activations overflow); SD 1.x/2.x ones never do."""
    sdxl = info.family in (Family.SDXL, Family.SDXL_REFINER)
    return sdxl and bool(pipe.vae.config.get("force_upcast", False))


def _model_index(pipe) -> dict:
    import diffusers

    entries = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pipe.config.items() if not k.startswith("_")}
    return {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__, **entries}






def _module_for(pipe, name):
    if name.endswith("_tiny"):
        return pipe.vae_tiny  # export/extras/tiny_vae.py
    if name.startswith("unet"):
        return pipe.unet  # unet, and export/extras/deepcache.py's two graphs
    return pipe.vae if name.startswith("vae") else getattr(pipe, name.removesuffix(EMBEDS))


def _export_one(pipe, spec, precision: str, tmp: Path, shapes, release: bool) -> dict:
    started = time.perf_counter()
    module_owner = spec.owner(pipe) if spec.owner is not None else _module_for(pipe, spec.name)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    flat = spec.name.replace("/", "--")  # controlnet/NAME
    fp32_weights = tmp / f".{flat}.fp32.pt"
    if dtype == torch.float16:  # keep the fp32 weights on disk for the gate's reference, not in memory
        torch.save(module_owner.state_dict(), fp32_weights)
        module_owner.half()
    wrapper = spec.make_module(pipe).eval()
    raw = tmp / f".{flat}.raw"
    raw.mkdir()
    with subpixel_upsampling(wrapper) as rewritten:
        torch_to_onnx(wrapper, spec.make_inputs(pipe, shapes[0], dtype), raw / "model.onnx",
                      spec.input_names, spec.output_names, spec.dynamic_axes)
        sized, upsamplers = upsamplers_sized(wrapper)
    rewrites = [f"{SUBPIXEL_PASS} ({rewritten} upsamplers)"] if rewritten else []
    if sized and sized == upsamplers:  # each up-sampler resizes to its skip connection: any latent size runs
        rewrites.append(f"{SKIP_SIZE_PASS} ({sized} upsamplers)")
    mapped = lora_weights.lora_component(spec.name)  # UNet variants map the UNet's weights as the UNet does
    mapper = Mapper(module_owner, mapped) if mapped in LORA_COMPONENTS else None  # LoRAs at load
    files, passes = run_passes(raw, tmp / spec.name, mapper)
    del mapper  # it holds the module, which is released below
    shutil.rmtree(raw)
    if dtype == torch.float16:
        module_owner.load_state_dict(torch.load(fp32_weights, mmap=True, weights_only=True), assign=True)
        fp32_weights.unlink()
    gc.collect()

    # Reference outputs first, then the torch module is released (when nothing later needs it) before
    # ONNX Runtime loads the graph: the two never hold a full-size UNet's weights at the same time.
    inputs = [spec.make_inputs(pipe, shape, dtype) for shape in shapes]
    references = [gate.reference_outputs(spec.make_module(pipe).eval(), x) for x in inputs]
    if release:
        setattr(pipe, spec.name, None)
    elif dtype == torch.float32 and files_bytes(tmp / spec.name) >= TWO_GB:  # (fp16: already mapped from disk above)
        _park(module_owner, tmp / f".{flat}.parked.pt")
    del module_owner
    gc.collect()
    cases = _gate_cases(spec, precision, tmp / spec.name / "model.onnx", shapes, inputs, references)
    all_figures = [gate.OutputFigures(**o) for c in cases for o in c["outputs"]]
    spec_io = io_specs(tmp / spec.name / "model.onnx")
    return {
        "files": files,
        "precision": precision,
        "opset": spec_io["opset"],
        "inputs": spec_io["inputs"],
        "outputs": spec_io["outputs"],
        "sha256": {f: sha256_of_file(tmp / spec.name / f) for f in files},
        "gate": {"bound": gate.bound_text(precision), "passed": gate.passes(precision, all_figures), "cases": cases},
        "passes": rewrites + ["torch.onnx.export(do_constant_folding)"] + passes,
        "export_seconds": round(time.perf_counter() - started, 2),
    }


def _park(module: torch.nn.Module, path: Path) -> None:
    """A full-size module that a later graph is traced from (the UNet under unet_pulid, …) waits on disk while ONNX
    Runtime holds this graph for the gate: its weights become file-backed pages (torch.load mmap) that the kernel
    can drop and read again, instead of a second full-size copy in memory."""
    torch.save(module.state_dict(), path)
    module.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    path.unlink()  # the mapping keeps the pages readable until the module lets go of them


def _gate_cases(spec, precision: str, path: Path, shapes, inputs, references) -> list[dict]:
    """The parity gate's figures per shape. ONNX Runtime failing to load or run the graph is an export failure
    told in one line (GateFailed), never a traceback out of the session."""
    cases, shape = [], None
    try:
        session = gate.cpu_session(path)
        for shape, x, ref in zip(shapes, inputs, references):
            figures = gate.compare_outputs(session, x, ref, spec.input_names, spec.output_names)
            cases.append({"shape": asdict(shape), "outputs": [asdict(f) for f in figures]})
    except Exception as e:  # onnxruntime's pybind errors (Fail, InvalidArgument, RuntimeException, …)
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        where = f" at {asdict(shape)}" if shape is not None else ""
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GateFailed(f"parity gate could not run {spec.name} ({precision}) in ONNX Runtime{where}: {detail} "
                         "(an sdrt export bug; please report it with the model's config)") from None
    return cases


def _worst(entry: dict) -> str:
    outs = [o for c in entry["gate"]["cases"] for o in c["outputs"]]
    if entry["precision"] == "fp32":
        w = max(outs, key=lambda o: o["rel_error"])
        return f"relative error {w['rel_error']:.3g} on '{w['name']}'"
    w = min(outs, key=lambda o: o["psnr_db"])
    return f"PSNR {w['psnr_db']:.1f} dB on '{w['name']}'"


def export(cfg: ExportConfig, progress: Progress = lambda name, status: None) -> dict:
    """Export cfg.model into cfg.output and return the manifest."""
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown precision {cfg.precision!r}; choose fp32 or fp16")
    if cfg.components:
        unknown = [c for c in cfg.components if c not in COMPONENT_NAMES]
        if unknown:
            raise UserError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENT_NAMES)}")
    output = Path(cfg.output).expanduser().absolute()
    # local sources as absolute paths: the manifest is read again from other folders (add_controlnets)
    cfg = ExportConfig(**{**asdict(cfg), "output": output, "tiny_vae": local_location(cfg.tiny_vae),
                          "image_encoder": local_location(cfg.image_encoder)})
    _check_output_parent(output)
    early_hash = local_source_hash(cfg.model, cfg.vae)
    if early_hash is not None:  # refuse a bad output before spending minutes loading a model
        _check_output(cfg, early_hash)
    for path, scale in cfg.loras:  # unreadable files and bad scales fail before the model loads
        lora_files.check_scale(scale, path)
        lora_files.read_header(Path(path).expanduser())
    hypernets = [(hypernetwork.load(path), hypernetwork.check_scale(scale, path)) for path, scale in cfg.hypernetworks]
    tiny = tiny_vae.load_tiny_vae(cfg.tiny_vae) if cfg.tiny_vae is not None else None  # fails before the model loads
    net_sources = [cn.parse_arg(a) for a in cfg.controlnets]
    for src in net_sources:
        cn.check_source(src)
    if len({s.name for s in net_sources}) != len(net_sources):
        raise UserError("two --controlnet sources have the same name; name them with SRC=NAME")
    t2i_sources = [t2i.parse(a) for a in cfg.t2i_adapters]
    iid_source = iid.parse(cfg.instantid) if cfg.instantid else None
    pulid_source = pulid.parse(cfg.pulid, cfg.pulid_eva, cfg.pulid_parsing)
    pm_source = pm.parse(cfg.photomaker) if cfg.photomaker else None
    ip_source = ipa.source_of(cfg.ip_adapter, cfg.image_encoder, local_location,
                              iid_source and (iid_source.adapter, iid.NAME))
    pipe, source = load_pipeline(cfg.model, vae=cfg.vae, family=cfg.family, config=cfg.single_file_config,
                                 source_hash=early_hash)
    info = detect(_model_index(pipe), dict(flow.denoiser(pipe).config), dict(pipe.scheduler.config))
    iid.check_family(info.family.value, iid_source)
    pulid.check_model(info.family.value, pulid_source, pipe)
    pm.check_family(info.family.value, pm_source)
    transformer_family = flow.is_flow(pipe)  # SD3 / FLUX.1: their own component specs and gate shapes
    if transformer_family:
        flow.check_options(cfg)  # what the transformer families do not take yet, refused before anything is written
    if (net_sources or ip_source or t2i_sources or cfg.deepcache) and has_timestep_cond(pipe):
        raise UserError("this UNet is LCM-distilled (time_cond_proj_dim: its guidance scale is an input); sdrt's "
                        "ControlNet, IP-Adapter, T2I-Adapter and step-caching graphs do not carry that input yet; "
                        "export it without them, or use an LCM-LoRA on the base model instead")
    old = _check_output(cfg, source.sha256)
    nets = cn.load_checked(pipe, net_sources)  # wrong family or width fails here, before anything is written
    lora_records = _fuse_loras(pipe, info, cfg.loras)
    if hypernets:
        hypernetwork.apply(pipe.unet, hypernets)
    hypernet_records = [{"name": h.name, "file": h.path, "sha256": h.sha256, "scale": scale} for h, scale in hypernets]
    specs = (flow.component_specs if transformer_family else component_specs)(pipe)
    latent_multiple = flow.latent_multiple(pipe) if transformer_family else None  # read before the loop releases it
    transformer_record = flow.manifest_record(pipe) if transformer_family else None
    tiny_signature = ""
    if tiny is not None:
        pipe.vae_tiny = tiny
        tiny_vae.check_matches(pipe.vae_tiny, pipe, cfg.tiny_vae)
        specs |= tiny_vae.tiny_specs()
        tiny_signature = tiny_vae.source_signature(cfg.tiny_vae)
    if cfg.deepcache:
        from sdrt.export.extras.deepcache import deepcache_specs

        specs = {**{k: v for k, v in specs.items() if not k.startswith("vae")}, **deepcache_specs(pipe),
                 **{k: v for k, v in specs.items() if k.startswith("vae")}}  # after the UNet, before the VAEs
    names = [n for n in specs if (n in cfg.components if cfg.components is not None
                                  else cfg.textual_inversion or not n.endswith(EMBEDS))]
    kept_tiny, tiny_record = reuse.kept_tiny_vae(cfg, old, output, source.sha256 + _lora_signature(lora_records))
    kept_nets = reuse.kept_controlnets(old, output, {s.name for s in net_sources}, ip_source is not None,
                                  {s.name for s in t2i_sources}) | kept_tiny
    extra = cn.specs_for(pipe, nets, bool(nets) or any(k.startswith(cn.PREFIX) for k in kept_nets))
    t2i_loaded = {src: t2i.load(src) for src in t2i_sources}
    t2i_used = {}
    for src, (adapter, digest) in t2i_loaded.items():
        t2i_used[src] = t2i.consumed(pipe, adapter, dict(pipe.unet.config))
        extra[t2i.PREFIX + src.name] = (t2i.adapter_spec(pipe, src.name, adapter), dict(adapter.config), "|t2i:" + digest)
    if t2i_loaded:
        src, (adapter, _) = next(iter(t2i_loaded.items()))
        extra[t2i.UNET_T2I] = (t2i.unet_spec(pipe, adapter, t2i_used[src]), dict(pipe.unet.config),
                               f"|t2i-unet:{t2i_used[src]}")
    ip_loaded = ipa.load(pipe, ip_source) if ip_source is not None else None
    if ip_loaded is not None:  # unet_controlnet_ip: ControlNets (or IdentityNet) and the image prompt in one request
        extra |= ipa.specs(pipe, ip_loaded, cn.UNET_CONTROLNET in extra or iid_source is not None)
    if iid_source is not None:
        extra |= iid.specs(pipe, iid_source, *iid.load_identitynet(pipe, iid_source, vae_scale_factor(pipe)), ip_loaded)
    pulid_loaded = pulid.load(pipe, pulid_source) if pulid_source is not None else None
    if pulid_loaded is not None:
        extra |= pulid.specs(pipe, pulid_loaded)
    pm_loaded = pm.load(pipe, pm_source) if pm_source is not None else None
    extra |= pm.specs(pm_loaded) if pm_loaded is not None else {}
    if not names:
        raise UserError(f"none of {', '.join(cfg.components)} exists in this pipeline; it has {', '.join(specs)}")
    _clean_stale_temps(output)
    tmp = output.parent / f".{output.name}.sdrt-tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write into {output.parent}: {e.strerror}") from None
    try:
        _write_pipeline_files(pipe, tmp, names, cfg.precision)
        components = {}
        for name, entry in kept_nets.items():  # ControlNets (and a tiny VAE) already there and not given again
            (tmp / name).mkdir(parents=True)
            for path in (output / name).iterdir():  # the graph's files, config.json, preprocessor_config.json
                os.link(path, tmp / name / path.name)
            components[name] = entry
            progress(name, "skipped")
        for name, (spec, config, digest) in extra.items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if ip_loaded is not None:
            ipa.write_configs(tmp, ip_loaded)
        if pm_loaded is not None:
            pm.write_files(tmp, pm_loaded)
        unet_at = names.index("unet") if "unet" in names else len(names)
        for name in names[:unet_at] + list(extra) + names[unet_at:]:  # before the UNet releases its module
            precision = cfg.precision
            kept = None
            if name.startswith("vae") and not name.endswith("_tiny") and precision == "fp16" and \
                    _vae_needs_fp32(pipe, info):
                precision, kept = "fp32", VAE_FP32_REASON
            if name == "depth_estimator" and precision == "fp16":
                precision, kept = "fp32", DEPTH_FP32_REASON
            digest = extra[name][2] if name in extra else ""
            signature = _lora_signature(lora_records) + digest + (tiny_signature if name.endswith("_tiny") else "") + \
                ("".join(f"|hypernet:{r['sha256']}:{r['scale']!r}" for r in hypernet_records)
                 if name.startswith("unet") else "")
            key = reuse.component_key(source.sha256 + signature, name, precision)
            release = not name.startswith("vae") and name not in extra  # the two halves of each VAE share one module
            if cfg.deepcache and name == "unet":
                release = False  # the step-caching graphs are traced from it next
            entry = reuse.reusable(old, output, name, key)
            if entry is not None:
                for rel in entry["files"]:
                    os.link(output / name / rel, tmp / name / rel)
                components[name] = entry
                if release and name in names:  # as if exported: a full-size re-export adding PuLID needs the memory
                    setattr(pipe, name, None)
                progress(name, "skipped")
                continue
            progress(name, "start")
            spec = extra[name][0] if name in extra else specs[name]
            shapes = (flow.gate_shapes if transformer_family else gate_shapes)(
                pipe, "vae_decoder" if name == ipa.IMAGE_ENCODER else
                                 "unet" if name in extra else name)
            if name == t2i.UNET_T2I or name.startswith(t2i.PREFIX):  # sizes the adapter can take
                shapes = t2i.gate_shapes(pipe, next(iter(t2i_loaded.values()))[0])
            t5_half = name == flow.T5 and precision == "fp16"  # kept fp32 when its fp16 graph fails the gate
            entry = _export_one(pipe, spec, precision, tmp, shapes, release and not t5_half)
            if t5_half and not entry["gate"]["passed"]:
                for rel in entry["files"]:
                    (tmp / name / rel).unlink()
                precision, kept = "fp32", T5_FP32_REASON
                entry = _export_one(pipe, spec, precision, tmp, shapes, release)
            elif t5_half and release:
                setattr(pipe, name, None)
            entry |= {"key": key, "kept_fp32_reason": kept}
            if not entry["gate"]["passed"]:
                raise GateFailed(f"parity gate failed for {name} ({precision}): {_worst(entry)}, "
                                 f"bound {entry['gate']['bound']}")
            components[name] = entry
            progress(name, "exported")
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdrt_version": versions().get("sdrt", "0"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": asdict(source),
            "family": info.family.value,
            "inpaint": info.inpaint,
            "prediction_type": info.prediction_type,
            "pipeline_class": info.pipeline_class,
            "scheduler": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
            "precision": cfg.precision,
            "latent_multiple": latent_multiple or _latent_multiple(pipe, components.get("unet")),
            "vae_scale_factor": vae_scale_factor(pipe),
            "transformer": transformer_record,
            "loras": lora_records,
            "hypernetworks": hypernet_records,
            "tiny_vae": tiny_record if cfg.tiny_vae is None else {"location": cfg.tiny_vae,
                                                                  "signature": tiny_signature.removeprefix("|tiny:")},
            "controlnets": [r for r in (old or {}).get("controlnets", []) if cn.PREFIX + r["name"] in kept_nets]
                           + [cn.record(src, net, digest) for src, (net, digest) in nets.items()],
            "ip_adapter": ip_loaded["record"] if ip_loaded is not None else
                          (old or {}).get("ip_adapter") if ipa.UNET_IP in kept_nets else None,
            "t2i_adapters": [r for r in (old or {}).get("t2i_adapters", []) if t2i.PREFIX + r["name"] in kept_nets]
                            + [t2i.record(src, a, digest, t2i_used[src], pipe) for src, (a, digest) in t2i_loaded.items()],
            "instantid": iid.record(iid_source, ip_loaded) if iid_source is not None else None,
            "pulid": pulid_loaded["record"] if pulid_loaded is not None else None,
            "photomaker": pm_loaded["record"] if pm_loaded is not None else None,
            "components": components,
            "trt": [],
            "versions": versions(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def add_controlnets(engine_dir: Path, controlnets: tuple[str, ...], progress: Progress = lambda n, s: None,
                    ip_adapter: str | tuple[str, ...] | None = None, image_encoder: str | None = None,
                    t2i_adapters: tuple[str, ...] = (), instantid: str | None = None, pulid: str | None = None,
                    photomaker: str | None = None, pulid_eva: str | None = None,
                    pulid_parsing: str | None = None) -> dict:
    """`sdrt export DIR --controlnet SRC` (or `--ip-adapter FILE --image-encoder DIR`): the directory's own export
    re-run with more ControlNets (or IP-Adapters, replacing the ones there). Every component
    already there is reused by its key (nothing re-traced); the model is loaded again from the manifest's source,
    which must still be there (the residual UNet and the gate's shapes need its UNet). The tiny VAE, step-caching
    graphs, textual-inversion variants and hypernetworks stay (the tiny VAE reused without its source)."""
    manifest = read_manifest(engine_dir)
    if manifest is None:
        raise UserError(f"{engine_dir} has no manifest.json; ControlNets are added to directories `sdrt export` wrote")
    if manifest.get("loras"):
        raise UserError(f"{engine_dir} was exported with LoRAs fused in; export the model again with --lora and "
                        "--controlnet together")
    source = manifest["source"]
    present = tuple(n for n in manifest["components"] if n in COMPONENT_NAMES)
    recorded = manifest.get("ip_adapter") or {}
    instantid = instantid or (manifest.get("instantid") or {}).get("source")  # kept: its graphs reused by key
    pulid = pulid or (manifest.get("pulid") or {}).get("source")
    photo = (manifest.get("pulid") or {}).get("photo") or {}  # PuLID's photo path, kept with its files
    pulid_eva, pulid_parsing = pulid_eva or photo.get("eva", {}).get("source"), \
        pulid_parsing or photo.get("parsing", {}).get("source")
    photomaker = photomaker or (manifest.get("photomaker") or {}).get("source")
    if not ip_adapter and image_encoder is None and recorded and (controlnets or instantid):  # they join the new ones
        ip_adapter, image_encoder = ipa.recorded_sources(recorded), recorded.get("image_encoder")
    hypernets = tuple((r["file"], r["scale"]) for r in manifest.get("hypernetworks") or [])
    cfg = ExportConfig(model=source["location"], output=Path(engine_dir), precision=manifest["precision"],
                       components=present, vae=source.get("vae"), family=source.get("family"),
                       single_file_config=source.get("config"), hypernetworks=hypernets,
                       deepcache=any(n.startswith("unet_deepcache") for n in present), controlnets=tuple(controlnets),
                       ip_adapter=ip_adapter, image_encoder=image_encoder, t2i_adapters=tuple(t2i_adapters),
                       instantid=instantid, pulid=pulid, photomaker=photomaker, pulid_eva=pulid_eva,
                       pulid_parsing=pulid_parsing)
    return export(cfg, progress)






def _fuse_loras(pipe, info, loras) -> list[dict]:
    """W += Σ scale · ΔW (fp32) in the pipeline's denoiser (UNet or transformer) and text encoders, before anything
    is traced."""
    if not loras:
        return []
    modules = {n: getattr(pipe, n) for n in LORA_COMPONENTS if getattr(pipe, n, None) is not None}
    model = lora_fuse.model_from_modules(modules, dict(flow.denoiser(pipe).config), info.family.value)
    return lora_fuse.fuse_into_modules(modules, model, loras)


def _lora_signature(records: list[dict]) -> str:
    return "".join(f"|lora:{r['sha256']}:{r['scale']!r}" for r in records)


def _latent_multiple(pipe, unet_entry: dict | None) -> int:
    """1 when the exported UNet resizes every up-sampler to its skip connection (any latent size runs), else
    its down-sampling factor (a UNet traced at a multiple of it doubles at every up-sampler)."""
    if unet_entry is not None and any(p.startswith(SKIP_SIZE_PASS) for p in unet_entry["passes"]):
        return 1
    return unet_factor(pipe)


def _check_output_parent(output: Path) -> None:
    if not output.parent.exists():
        raise UserError(f"cannot write {output}: the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output}: no write permission in {output.parent}")


def _swap_into_place(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.sdrt-old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
