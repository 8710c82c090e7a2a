"""`sdrt info` and `sdrt samplers`: what an engine directory holds, and the samplers sdrt runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console


def info(engine_dir: Path = typer.Argument(..., help="an engine directory written by `sdrt export` or optimum-cli")) -> None:
    """Print what an engine directory holds and which backends this machine can run it on."""
    from sdrt.cli.describe import describe

    d = describe(engine_dir)
    print(f"{d['engine_dir']}")
    kind = {"StableDiffusionUpscalePipeline": " (×4 upscaler: sdrt upscale)",
            "StableDiffusionDepth2ImgPipeline": " (depth-to-image)",
            "StableUnCLIPImg2ImgPipeline": " (unCLIP: sdrt variations)"}.get(d.get("pipeline_class"), "")
    print(f"family {d['family']}{' (inpaint)' if d['inpaint'] else ''}{kind}, prediction {d['prediction_type']}, "
          f"written by {d['writer']}")
    for name, c in d["components"].items():
        print(f"  {name:<15} {c['precision']:<17} gate {c['gate']}, worst {c['figure']}; files {', '.join(c['files'])}")
    print(f"TensorRT plans: {', '.join(d['plans']) if d['plans'] else 'none built'}")
    print(f"backends on this machine: {', '.join(d['backends'])}")


def samplers(as_json: bool = typer.Option(False, "--json", help="print the table as JSON")) -> None:
    """List the samplers: sdrt's name, AUTOMATIC1111's names, the diffusers scheduler each equals, and more.

    --sampler takes any name in the first two columns (case and spacing do not matter). A name with a schedule
    suffix ("DPM++ 2M Karras") selects that schedule; otherwise --schedule does (default: the model's).
    """
    from rich.table import Table

    from sdrt.runtime.samplers.registry import REGISTRY, display_names

    rows = [{"name": s.name, "a1111": list(display_names(s)), "diffusers": s.diffusers_class,
             "diffusers_config": dict(s.diffusers_config), "stochastic": s.stochastic,
             "schedules": ["default", "sgm_uniform", *s.conversions], "description": s.description}
            for s in REGISTRY.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="sdrt samplers", caption="every sampler also takes --schedule default and sgm_uniform "
                                                 "(= simple); `sdrt samplers --json` has the diffusers configs")
    for column in ("name", "AUTOMATIC1111 names", "diffusers scheduler", "noise", "sigma schedules"):
        table.add_column(column, no_wrap=column == "name")
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r["diffusers_config"].items())
        table.add_row(r["name"], "\n".join(r["a1111"]) or "-",
                      r["diffusers"].removesuffix("Scheduler") + (f"\n{config}" if config else ""),
                      "random" if r["stochastic"] else "-", ", ".join(r["schedules"][2:]) or "-")
    Console().print(table)
