"""Report writers for one benchmark result: a rich table, JSON, Markdown and a PNG chart (drawn with PIL).

All of them read the result dict `sdrt.bench.harness.run` returns; nothing here measures anything.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MAX_STEP_ROWS = 8  # more steps than this: one "UNet step (median of all)" row instead of one row per step

STAGE_LABELS = {"text_encoding": "text encoding", "unet": "UNet total", "vae_decode": "VAE decode",
                "runtime_overhead": "runtime overhead", "end_to_end": "end to end"}


# ---- shared pieces ---------------------------------------------------------------------------------------

def ok_backends(result: dict) -> dict:
    return {name: b for name, b in result["backends"].items() if b.get("status") == "ok"}


def failed_backends(result: dict) -> dict:
    return {name: b for name, b in result["backends"].items() if b.get("status") != "ok"}


def scenario_line(result: dict) -> str:
    s = result["scenario"]
    guidance = f"guidance {s['guidance']:g}" if s["guidance"] > 1 else "no guidance"
    spacing = f" {s['timestep_spacing']}" if s["timestep_spacing"] else ""
    c = result["config"]
    return (f"{s['name']}: {Path(s['model']).name} {s['width']}x{s['height']}, {s['steps']} steps "
            f"{s['sampler']}{spacing}, {guidance}, batch {s['batch']}, {s['precision']} — "
            f"{c['runs']} runs after {c['warmup']} warm-up, {c['threads']} threads"
            f"{', backends interleaved in one process' if c.get('interleave') else ''}"
            f"{', backends alternating, a fresh process per run' if c.get('alternate') else ''}"
            f"{'; +tiny-vae: decoded by the tiny VAE (TAESD)' if s.get('vae') == 'tiny' else ''}"
            f"{'; +cache' + str(s['cache_interval']) + ': step caching (DeepCache branch 0)' if s.get('cache_interval', 1) > 1 else ''}")


def machine_line(result: dict) -> str:
    m = result["machine"]
    gpu = f", GPU {m['gpu']['name']} ({m['gpu']['memory_gib']} GiB)" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores_physical'] or m['cores_logical']} cores, {m['memory_gib']} GiB{gpu}"


def peak_line(result: dict) -> str:
    p = result["peak"]
    return f"machine peak {p['flops_per_second'] / 1e9:,.1f} GFLOP/s ({p['what']})"


def denoiser_label(result: dict) -> str:
    return "transformer" if result.get("model", {}).get("denoiser") == "transformer" else "UNet"


def stage_rows(result: dict) -> list[tuple[str, str, int | None]]:
    """(label, key, step index or None): key is a stats key of every backend; the index picks a step."""
    steps = result["scenario"]["steps"]
    unet = denoiser_label(result)
    backend = next(iter(ok_backends(result).values()), None)
    measured_steps = len(backend["stats"]["unet_steps"]) if backend else steps
    rows = [("text encoding", "text_encoding", None)]
    if measured_steps <= MAX_STEP_ROWS:
        rows += [(f"{unet} step {i + 1}", "unet_steps", i) for i in range(measured_steps)]
    else:
        rows.append((f"{unet} step (median of {measured_steps})", "unet_step", None))
    rows += [(f"{unet} total", "unet", None), ("VAE decode", "vae_decode", None),
             ("runtime overhead", "runtime_overhead", None), ("end to end", "end_to_end", None)]
    return rows


def stat_of(backend: dict, key: str, index: int | None) -> dict | None:
    value = backend["stats"].get(key)
    if index is not None:
        value = value[index] if value and index < len(value) else None
    return value


def achieved_of(backend: dict, key: str, result: dict, index: int | None) -> tuple[float, float | None] | None:
    """(FLOP/s, fraction of peak) for a row, or None when the row has no FLOPs (overhead)."""
    achieved = backend["achieved"]
    peak = result["peak"]["flops_per_second"]
    if key in achieved:
        a = achieved[key]
        return a["flops_per_second"], a["fraction_of_peak"]
    if key in ("unet_steps", "unet_step"):  # per step: the UNet's FLOPs spread evenly over its steps
        steps = max(len(backend["stats"]["unet_steps"]), 1)
        flops = achieved["unet"]["flops"] / steps
        s = stat_of(backend, key, index)
        if not s or s["median"] <= 0:
            return None
        rate = flops / s["median"]
        return rate, rate / peak if peak else None
    return None


def gflop_text(flops: float) -> str:
    g = flops / 1e9
    return f"{g:,.1f}" if g >= 10 else f"{g:.3g}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def rate_text(a: tuple[float, float | None] | None) -> str:
    if a is None or a[0] == 0:
        return "—"
    rate, fraction = a
    share = f" ({fraction:.1%})" if fraction is not None else ""
    return f"{rate / 1e9:,.1f}{share}"


def gflops_of(result: dict, key: str) -> str:
    backend = next(iter(ok_backends(result).values()), None)
    if backend is None:
        return ""
    if key in backend["achieved"]:
        return gflop_text(backend['achieved'][key]['flops'])
    if key in ("unet_steps", "unet_step"):
        steps = max(len(backend["stats"]["unet_steps"]), 1)
        return gflop_text(backend['achieved']['unet']['flops'] / steps)
    return ""


# ---- terminal ----------------------------------------------------------------------------------------------

def rich_table(result: dict):
    from rich.table import Table

    backends = ok_backends(result)
    table = Table(title=scenario_line(result), caption=f"{machine_line(result)}\n{peak_line(result)}\n"
                  "ms: median (p90); GFLOP/s: achieved (share of the machine peak)", title_justify="left",
                  caption_justify="left")
    table.add_column("stage")
    table.add_column("GFLOP", justify="right")
    for name in backends:
        table.add_column(f"{name} ms", justify="right")
        table.add_column(f"{name} GFLOP/s", justify="right")
    for label, key, index in stage_rows(result):
        cells = [label, gflops_of(result, key)]
        for b in backends.values():
            s = stat_of(b, key, index)
            cells += [f"{ms(s['median'])} ({ms(s['p90'])})" if s else "—", rate_text(achieved_of(b, key, result, index))]
        table.add_row(*cells, end_section=key == "runtime_overhead")
    table.add_row("images/s", "", *[c for b in backends.values() for c in (f"{b['images_per_second']:.3g}", "")])
    table.add_row("peak RSS GiB", "", *[c for b in backends.values() for c in (f"{b['memory']['peak_rss_gib']:.2f}", "")])
    if any("gpu_max_allocated_gib" in b["memory"] for b in backends.values()):
        table.add_row("GPU max allocated GiB", "",
                      *[c for b in backends.values() for c in (f"{b['memory'].get('gpu_max_allocated_gib', 0):.2f}", "")])
    return table


# ---- Markdown ---------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    backends = ok_backends(result)
    lines = [f"# sdrt bench — {result['scenario']['name']}", "",
             f"- scenario: {scenario_line(result)}",
             f"- model: `{result['model']['engine_dir']}` (latent {result['model']['latent'][0]}x{result['model']['latent'][1]})",
             f"- machine: {machine_line(result)}",
             f"- {peak_line(result)}",
             f"- load average (1, 5, 15 min) before / after: {result['conditions']['load_average_before']} / "
             f"{result['conditions']['load_average_after']}" if result.get("conditions") else "",
             f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
             f"- FLOPs: {result['flops']['method']}",
             f"- command: `{result['command']}`" if result.get("command") else "",
             f"- created: {result['created']}", ""]
    names = list(backends)
    lines += ["## Medians (ms)", "", "| stage | GFLOP | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for label, key, index in stage_rows(result):
        cells = [ms(s["median"]) if (s := stat_of(b, key, index)) else "—" for b in backends.values()]
        lines.append(f"| {label} | {gflops_of(result, key)} | " + " | ".join(cells) + " |")
    lines.append("| images/s | | " + " | ".join(f"{b['images_per_second']:.3g}" for b in backends.values()) + " |")
    lines.append("| peak RSS GiB | | " + " | ".join(f"{b['memory']['peak_rss_gib']:.2f}" for b in backends.values()) + " |")
    lines.append("")
    lines += tiny_vae_lines(result)
    for name, b in backends.items():
        lines += [f"## {name}", "", f"{b['device']}; load {b['load_seconds']:.2f} s; {b['notes']}".rstrip("; "), "",
                  "| stage | median ms | p90 ms | min ms | max ms | GFLOP/s | % of peak |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, key, index in stage_rows(result):
            s = stat_of(b, key, index)
            a = achieved_of(b, key, result, index)
            rate = f"{a[0] / 1e9:,.1f}" if a and a[0] else "—"
            share = f"{a[1]:.1%}" if a and a[0] and a[1] is not None else "—"
            if s:
                lines.append(f"| {label} | {ms(s['median'])} | {ms(s['p90'])} | {ms(s['min'])} | {ms(s['max'])} | "
                             f"{rate} | {share} |")
        lines.append("")
    for name, b in failed_backends(result).items():
        lines += [f"## {name}: failed", "", "```", b.get("error", ""), "```", ""]
    if result.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w.splitlines()[0]}" for w in result["warnings"]] + [""]
    return "\n".join(line for line in lines if line is not None) + "\n"


def variant_suffix(scenario: dict) -> str:
    """The result-key suffix of runs with the tiny VAE and/or step caching (bench/measure/jobs.py Job.key)."""
    return ("+tiny-vae" if scenario.get("vae") == "tiny" else "") + \
        (f"+cache{scenario['cache_interval']}" if scenario.get("cache_interval", 1) > 1 else "")


def tiny_vae_lines(result: dict) -> list[str]:
    """With --vae tiny and/or --cache-interval: each sdrt backend's VAE decode, UNet and end to end against diffusers
    doing the same (the fair ratio) and against plain diffusers (what a user gains), and the images' PSNR against
    plain diffusers (the quality cost)."""
    backends = ok_backends(result)
    suffix = variant_suffix(result["scenario"])
    if not suffix:
        return []
    lines = [f"## Speed-ups of {suffix.lstrip('+').replace('+', ' and ')} (median against median)", "",
             f"| sdrt backend | stage | sdrt ms | diffusers{suffix} ms | × (fair) | diffusers ms | × (gain) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    fair, full = backends.get("diffusers" + suffix), backends.get("diffusers")
    for name, b in backends.items():
        if name.startswith("diffusers"):
            continue
        for stage in ("unet", "vae_decode", "end_to_end"):
            ours = b["stats"][stage]["median"]
            cells = []
            for other in (fair, full):
                theirs = other["stats"][stage]["median"] if other else None
                cells += [ms(theirs) if theirs else "—", f"{theirs / ours:.2f}×" if theirs and ours else "—"]
            lines.append(f"| {name} | {STAGE_LABELS[stage]} | {ms(ours)} | " + " | ".join(cells) + " |")
    quality = result.get("quality_psnr_db_vs_diffusers") or {}
    if quality:
        lines += ["", "Quality: PSNR of each run's first image against plain diffusers' — "
                  + ", ".join(f"{k} {v:.1f} dB" for k, v in quality.items()) + "."]
    return lines + [""]


# ---- PNG chart --------------------------------------------------------------------------------------------

COLORS = {"text_encoding": (76, 114, 176), "unet_a": (221, 132, 82), "unet_b": (240, 170, 120),
          "vae_decode": (85, 168, 104), "runtime_overhead": (150, 150, 150)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def segments(backend: dict) -> list[tuple[str, float]]:
    """(color key, median seconds) left to right: text encoding, each UNet step, VAE decode, overhead."""
    st = backend["stats"]
    out = [("text_encoding", st["text_encoding"]["median"])]
    out += [("unet_a" if i % 2 == 0 else "unet_b", s["median"]) for i, s in enumerate(st["unet_steps"])]
    out += [("vae_decode", st["vae_decode"]["median"]), ("runtime_overhead", max(st["runtime_overhead"]["median"], 0.0))]
    return out


def ticks(longest: float, wanted: int = 5) -> list[float]:
    """Round tick positions (1, 2 or 5 × 10^k ms apart) from 0 to `longest` seconds."""
    import math

    raw = longest * 1e3 / wanted
    base = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return [i * step / 1e3 for i in range(int(longest * 1e3 / step) + 1)]


def chart(result: dict, width: int = 1000) -> Image.Image:
    backends = ok_backends(result)
    font, small = _font(15), _font(12)
    left, right, top, bar, gap = 170, 110, 60, 34, 18
    height = top + len(backends) * (bar + gap) + 80
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), f"sdrt bench: {scenario_line(result)}".replace("—", "-")[:160], fill="black", font=small)
    draw.text((12, 30), "median stage times, stacked (UNet steps alternate shades)", fill=(90, 90, 90), font=small)
    longest = max((sum(t for _, t in segments(b)) for b in backends.values()), default=0.0) or 1.0
    scale = (width - left - right) / longest
    for row, (name, b) in enumerate(backends.items()):
        y = top + row * (bar + gap)
        draw.text((12, y + bar // 2 - 8), name, fill="black", font=font)
        x = float(left)
        for key, seconds in segments(b):
            x_end = x + seconds * scale
            if x_end - x >= 0.5:
                draw.rectangle([x, y, x_end, y + bar], fill=COLORS[key], outline="white")
            x = x_end
        total = b["stats"]["end_to_end"]["median"]
        draw.text((x + 8, y + bar // 2 - 8), f"{ms(total)} ms", fill="black", font=font)
    axis_y = top + len(backends) * (bar + gap)
    draw.line([left, axis_y, width - right, axis_y], fill="black")
    for seconds in ticks(longest):
        x = left + seconds * scale
        draw.line([x, axis_y, x, axis_y + 5], fill="black")
        label = f"{seconds * 1e3:,.6g}"
        draw.text((x - draw.textlength(label, font=small) / 2, axis_y + 8), label, fill="black", font=small)
    legend = [("text_encoding", "text encoding"), ("unet_a", "UNet steps"), ("vae_decode", "VAE decode"),
              ("runtime_overhead", "runtime overhead")]
    x = left
    for key, label in legend:
        draw.rectangle([x, axis_y + 36, x + 14, axis_y + 50], fill=COLORS[key])
        draw.text((x + 20, axis_y + 35), label, fill="black", font=small)
        x += 40 + int(draw.textlength(label, font=small))
    draw.text((left - 30, axis_y + 8), "ms", fill="black", font=small)
    return image


# ---- the results folder -----------------------------------------------------------------------------------

def default_folder(scenario_name: str, root: Path = Path("bench/results"), now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    folder = root / f"{scenario_name}-{stamp}"
    n = 2
    while folder.exists():
        folder = root / f"{scenario_name}-{stamp}-{n}"
        n += 1
    return folder


def write_all(result: dict, folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "result.json", "markdown": folder / "result.md", "chart": folder / "stages.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown(result))
    if ok_backends(result):
        chart(result).save(paths["chart"])
    else:
        del paths["chart"]
    return paths
