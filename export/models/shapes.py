"""The embedded "shapes" model: a small Stable-Diffusion-architecture pipeline trained here on captioned shapes.

Real diffusers/transformers classes, scaled down: CLIPTextModel + a CLIP BPE tokenizer built over the
caption vocabulary, UNet2DConditionModel with cross-attention, AutoencoderKL (factor 8, 4 latent
channels), EulerDiscreteScheduler with SD's scaled_linear betas; epsilon prediction, trained with
caption dropout so classifier-free guidance works, with offset noise. Packed weights are in export/models/shapes_model/
(fp16 safetensors, checked against hashes.json when loaded), with the training record (training.json, loss.png) and
extras trained for the model (a tiny VAE, a LoRA, a ControlNet: export/models/shapes_tiny_vae.py, export/models/shapes_lora.py,
export/models/shapes_controlnet.py). The shipped weights came from the stages listed in training.json's `as_run` (about
2 h 15 min of one-thread stages, two at a time, then a 35-minute two-thread round with stronger offset noise, on a
2-core CPU); they draw the asked background colour every time, the shape colour about 94 % and the shape kind about
75 % of the time (bench/shapes_eval.py).

This module is the model as the runtime, `make demo` and the tests use it: its architecture, tokenizer, and the shipped
weights (packing, content hashes, writing and loading). Training it, the helpers the extras' trainers share, and the
command line (`python -m sdrt.export.models.shapes_train train|render|write`) are in export/models/shapes_train.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sdrt.export.load import sha256_of_file
from sdrt.export.models import shapes_data as data
from sdrt.export.models.tiny_tokenizer import BOS, EOS, bytes_to_unicode, train_merges

SHIPPED = Path(__file__).parent / "shapes_model"
HASHES = "hashes.json"
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
}
TEXT_WIDTH = 64


class TamperedWeights(RuntimeError):
    """A shipped file does not match its recorded content hash."""


# --- tokenizer --------------------------------------------------------------------------------------------

def write_tokenizer(folder: Path) -> int:
    """A CLIP-layout BPE tokenizer trained on the caption vocabulary (each caption word becomes one token)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = train_merges(data.vocabulary_corpus(), 200)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


# --- the models -------------------------------------------------------------------------------------------

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=16, sample_size=data.SIZE, scaling_factor=1.0,
    )


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=data.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
    )


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- shipping: fp16 weights + content hashes --------------------------------------------------------------

def _ship_file(src: Path, target: Path) -> None:
    """One file into the package: .safetensors with floating tensors stored as fp16, anything else copied."""
    from safetensors.torch import load_file, save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".safetensors":
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(src).items()}, target)
    else:
        shutil.copy(src, target)


def pack(trained: Path, dest: Path = SHIPPED) -> None:
    """Copy a trained folder into the package: weights as fp16, configs, tokenizer, record, hashes.json."""
    trained = Path(trained)
    for f in trained.rglob("*"):
        if f.is_file() and f.name != "train.log" and f.suffix != ".bin":
            _ship_file(f, dest / f.relative_to(trained))
    write_hashes(dest)


def add_extra(src: Path, rel: str, dest: Path = SHIPPED) -> Path:
    """Ship a file or folder trained for the model (a tiny VAE, a LoRA, a ControlNet) as dest/extras/REL:
    .safetensors as fp16, other files as they are; then hashes.json again."""
    src, target = Path(src), dest / "extras" / rel
    if src.is_file():
        _ship_file(src, target)
    for f in sorted(src.rglob("*")) if src.is_dir() else ():
        if f.is_file():
            _ship_file(f, target / f.relative_to(src))
    write_hashes(dest)
    return target


def write_hashes(dest: Path = SHIPPED) -> dict[str, str]:
    """hashes.json over the shipped weights, configs, tokenizer files and LoRAs (loras/), which verify() checks."""
    hashes = {str(p.relative_to(dest)): sha256_of_file(p) for p in sorted(dest.rglob("*"))
              if p.is_file() and p.name != HASHES and p.suffix in (".safetensors", ".json", ".txt")
              and p.parent != dest or p.name == "model_index.json"}
    (dest / HASHES).write_text(json.dumps(hashes, indent=1) + "\n")
    return hashes


def verify(src: Path = SHIPPED) -> dict[str, str]:
    """Check every file listed in hashes.json; raise TamperedWeights (one line) on the first mismatch."""
    hashes_file = src / HASHES
    if not hashes_file.exists():
        raise TamperedWeights(f"{hashes_file} is missing: the shipped shapes model is incomplete")
    hashes = json.loads(hashes_file.read_text())
    for rel, digest in hashes.items():
        path = src / rel
        if not path.exists():
            raise TamperedWeights(f"shapes model file {rel} is missing")
        if sha256_of_file(path) != digest:
            raise TamperedWeights(f"shapes model file {rel} does not match its recorded SHA-256 "
                                  f"(expected {digest[:12]}…): refusing to load it")
    return hashes


def write_shapes_pipeline(folder: Path, src: Path = SHIPPED) -> Path:
    """Verify the shipped model and write it as a diffusers folder (fp32 weights) that from_pretrained loads."""
    from safetensors.torch import load_file, save_file

    hashes = verify(src)
    folder = Path(folder)
    for rel in hashes:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".safetensors"):
            save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(src / rel).items()}, target)
        else:
            shutil.copy(src / rel, target)
    return folder


def tiny_vae_of(model: Path) -> str | None:
    """The tiny VAE trained for the model (export/models/shapes_tiny_vae.py) in a folder write_shapes_pipeline wrote, if any:
    what `sdrt export --tiny-vae` takes."""
    tiny = Path(model) / "extras" / "tiny-vae"
    return str(tiny) if (tiny / "config.json").exists() else None


def load_pipeline(src: Path = SHIPPED):
    """The shipped model as a diffusers StableDiffusionPipeline (fp32), after the hash check."""
    import tempfile

    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        return StableDiffusionPipeline.from_pretrained(write_shapes_pipeline(Path(tmp) / "m", src))
