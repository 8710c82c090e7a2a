"""Prompts → text-encoder states under a prompt syntax and a clip skip (reference/customization.md §2).

Three syntaxes, chosen per request:
- `a1111` (default): AUTOMATIC1111's attention syntax, BREAK, 75-token chunks each wrapped in BOS/EOS and
  concatenated along the sequence axis, "Original" emphasis (runtime/prompts/a1111.py); SDXL's pooled vector
  comes from the first chunk.
- `compel`: compel's syntax and weighting (runtime/prompts/compel.py); SDXL's pooled vector from the raw text.
- `plain`: diffusers' own encoding: no syntax, one chunk, longer prompts truncated with diffusers' warning.
A prompt without syntax characters and at most 75 tokens gives the same states in all three.

Every prompt and negative prompt of a job is padded with empty-prompt chunks to the job's chunk count (the
UNet's `encoder_hidden_states` is [N, 77·k, C]); runtime/validate.py computes k, and runtime/batching.py
batches only jobs of equal k, so an image is the same alone or batched.

Clip skip N (diffusers' numbering: 0 = the model's usual layer, 1 = one layer earlier, AUTOMATIC1111's "Clip
skip 2"): SD 1.x/2.x take hidden_states[-(N+1)] through the final layer norm (N = 0: last_hidden_state);
SDXL takes each encoder's hidden_states[-(N+2)] without it. In `plain` mode the negative prompt ignores clip
skip, as diffusers' encode_prompt does; `a1111` and `compel` apply it to both, as AUTOMATIC1111 does.

Textual inversion (runtime/prompts/embeddings.py): rows that hold an embedding's vectors run on the text encoder's
inputs_embeds variant (`text_encoder[_2]_embeds/`, exported with textual-inversion support), fed the token
vectors looked up in the exported table with the embedding's spliced in; other rows run on the plain encoder.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sdrt.runtime.denoiser import feed
from sdrt.runtime.prompts import a1111 as prompt_a1111, compel as prompt_compel, flux_compel
from sdrt.runtime.family import Family
from sdrt.runtime import fields
from sdrt.runtime.fields import InvalidRequest

log = logging.getLogger("sdrt")

SYNTAXES = ("a1111", "compel", "plain")
DEFAULT_SYNTAX = "a1111"
TEXT_WEIGHTS = "text_weights.npz"  # by the exporter, beside each text encoder: final layer norm [, token table]


@dataclass(frozen=True)
class TextOptions:
    syntax: str = DEFAULT_SYNTAX
    clip_skip: int = 0
    chunks: int = 1  # 77-token chunks every prompt of the job is padded to
    embeddings: tuple = ()  # runtime/prompts/embeddings.Embedding: the textual inversions prompts may use
    max_sequence_length: int = 256  # SD3's T5 sequence (StableDiffusion3Pipeline's default; at most 512)


@dataclass(frozen=True)
class Texts:
    positive: torch.Tensor  # [B, 77·k, C]
    negative: torch.Tensor | None  # [B, 77·k, C]; None without guidance
    pooled: torch.Tensor | None = None  # SDXL [B, P]
    negative_pooled: torch.Tensor | None = None


def is_sdxl(family: Family) -> bool:
    return family in (Family.SDXL, Family.SDXL_REFINER)


# ---- the final layer norm (clip skip on SD 1.x/2.x) ------------------------------------------------------

@functools.lru_cache(maxsize=8)
def final_norm(folder: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weight, bias, eps) of a text encoder's final layer norm: from the exporter's text_weights.npz, else read
    from model.onnx with the `onnx` package (folders of older sdrt versions and of optimum)."""
    from sdrt.runtime.errors import UserError

    path = Path(folder)
    side = path / TEXT_WEIGHTS
    if side.is_file():
        with np.load(side, allow_pickle=False) as data:
            return (torch.from_numpy(data["final_layer_norm.weight"].astype(np.float32)),
                    torch.from_numpy(data["final_layer_norm.bias"].astype(np.float32)),
                    float(data["final_layer_norm.eps"]))
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError(f"clip skip needs the final layer norm of {path.name}: re-export the model with this sdrt "
                        f"(it writes {path.name}/{TEXT_WEIGHTS}) or install the onnx package") from None
    model = onnx.load(str(path / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get("last_hidden_state")
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producers.get(node.input[0])
    inits = {t.name: t for t in model.graph.initializer}
    if node is None or node.op_type != "LayerNormalization" or not all(n in inits for n in node.input[1:3]):
        raise UserError(f"{path / 'model.onnx'}: last_hidden_state does not come from a layer norm with stored "
                        "weights; clip skip cannot be applied to this export (re-export it with sdrt)")
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    weight, bias = (torch.from_numpy(numpy_helper.to_array(inits[n]).astype(np.float32)) for n in node.input[1:3])
    return weight, bias, float(eps)


def write_text_weights(encoder, folder: Path, table: bool = False, half: bool = False) -> None:
    """Export side: a transformers CLIP text model's final layer norm (clip skip at run time) and, with `table`,
    its token-embedding table (textual inversion: the runtime looks tokens up itself), fp16 when `half`."""
    model = getattr(encoder, "text_model", encoder)
    norm = getattr(model, "final_layer_norm", None)
    if norm is None:  # not CLIP (FLUX.1's T5 as text_encoder_2): no clip skip, no token table
        return
    arrays = {"final_layer_norm.weight": norm.weight.detach().float().cpu().numpy(),
              "final_layer_norm.bias": norm.bias.detach().float().cpu().numpy(),
              "final_layer_norm.eps": np.array(norm.eps, dtype=np.float64)}
    if table:
        weight = model.embeddings.token_embedding.weight.detach().cpu()
        arrays["token_embedding.weight"] = (weight.half() if half else weight.float()).numpy()
    np.savez(folder / TEXT_WEIGHTS, **arrays)


# ---- textual inversion on one text encoder ----------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def token_table(folder: str) -> np.ndarray:
    """The token-embedding table the exporter wrote beside a text encoder's inputs_embeds variant."""
    with np.load(Path(folder) / TEXT_WEIGHTS, allow_pickle=False) as data:
        return data["token_embedding.weight"]


class Inversions:
    """One text encoder's view of a set of embeddings (runtime/prompts/embeddings.py).

    `a1111`: `find` matches a trigger's token ids in a prompt (longest first), as AUTOMATIC1111 does.
    `plain`/`compel`: `tokenizer` knows `name`, `name_1`, … as added tokens and `convert` expands a trigger in
    the raw text to all of them, as diffusers' load_textual_inversion and maybe_convert_prompt do; `added` maps
    their ids to vectors."""

    def __init__(self, tokenizer, embeddings: Sequence, index: int):
        self.by_name = {e.name: e.vectors[index] for e in embeddings}
        names, vectors = [], []
        for e in embeddings:
            for j, vector in enumerate(e.vectors[index]):
                names.append(e.name if j == 0 else f"{e.name}_{j}")
                vectors.append(vector)
        self.tokenizer = tokenizer.with_added(names)
        self.added = {self.tokenizer.token_id(n): v for n, v in zip(names, vectors)}
        self.added_names = dict(zip((self.tokenizer.token_id(n) for n in names), names))
        self.lookup: dict[int, list] = {}
        for e in embeddings:
            ids = tokenizer.tokens(e.name)
            if ids:
                self.lookup.setdefault(ids[0], []).append((ids, e.name))
        for candidates in self.lookup.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def find(self, tokens: Sequence[int], position: int):
        for ids, name in self.lookup.get(tokens[position], ()):
            if list(tokens[position:position + len(ids)]) == ids:
                return name, self.by_name[name].shape[0], len(ids)
        return None

    def convert(self, text: str) -> str:
        """diffusers' maybe_convert_prompt: each added token found expands to itself and its _1, _2, … tokens."""
        found = {self.added_names[i] for i in self.tokenizer.tokens(text) if i in self.added_names}
        for token in found:
            replacement, i = token, 1
            while f"{token}_{i}" in self.by_name or self.tokenizer.token_id(f"{token}_{i}") in self.added_names:
                replacement += f" {token}_{i}"
                i += 1
            text = text.replace(token, replacement)
        return text


# ---- one text encoder -------------------------------------------------------------------------------------

class Encoder:
    """A text-encoder engine with its tokenizer: 77-token id rows → the states a family and clip skip select.

    With embeddings, rows that hold their vectors run on the encoder's inputs_embeds variant (exported with
    textual-inversion support): token vectors looked up in the exported table, the embedding's spliced in."""

    def __init__(self, tokenizer, engine, family: Family, folder: Path | None = None, variant=None,
                 embeddings: Sequence = (), index: int = 0):
        self.tokenizer = tokenizer
        self.engine = engine
        self.family = family
        self.folder = folder
        self.variant = variant  # () → the inputs_embeds engine, or None
        self.inversions = Inversions(tokenizer, embeddings, index) if embeddings else None
        layers = [int(n.split(".")[1]) for n in engine.outputs if n.startswith("hidden_states.")]
        self.layers = max(layers) if layers else None  # index of the last encoder layer's output

    @property
    def text_tokenizer(self):
        """The tokenizer of `plain` and `compel` prompts: with the embeddings' added tokens."""
        return self.inversions.tokenizer if self.inversions else self.tokenizer

    def convert(self, text: str) -> str:
        return self.inversions.convert(text) if self.inversions else text

    def output_for(self, clip_skip: int) -> tuple[str, bool]:
        """(output name, whether the final layer norm follows) for this clip skip."""
        if is_sdxl(self.family):
            return self._hidden(clip_skip + 1), False
        if clip_skip == 0:
            return "last_hidden_state", False
        return self._hidden(clip_skip), True

    def _hidden(self, back: int) -> str:
        if self.layers is None:
            raise ValueError("this text encoder exports no hidden_states.N outputs; re-export it with sdrt")
        index = self.layers - back
        if index < 0:
            raise ValueError(f"clip skip reaches before the first layer of this {self.layers}-layer text encoder")
        return f"hidden_states.{index}"

    def run(self, ids, clip_skip: int, splices: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [B, 77] → (states [B, 77, C] fp32, pooled text_embeds [B, P] or None). `splices`: per row,
        {position: vector} of embedding vectors (a1111); ids of added tokens bring their vectors themselves."""
        rows = np.asarray(ids, dtype=np.int64)
        splices = [dict(s) for s in splices] if splices is not None else [{} for _ in rows]
        if self.inversions is not None:
            for b, row in enumerate(rows):
                for position, token in enumerate(row):
                    if int(token) in self.inversions.added:
                        splices[b][position] = self.inversions.added[int(token)]
        if any(splices):
            out = self._run_variant(rows, splices)
        else:
            out = feed.run(self.engine, input_ids=torch.from_numpy(rows))
        name, normed = self.output_for(clip_skip)
        states = out[name]
        if normed:
            weight, bias, eps = final_norm(str(self.folder))
            states = torch.nn.functional.layer_norm(states, (states.shape[-1],), weight.to(states.device),
                                                    bias.to(states.device), eps)
        return states, out.get("text_embeds")

    def _run_variant(self, rows: np.ndarray, splices: list[dict]) -> dict:
        from sdrt.runtime.errors import UserError

        engine = self.variant() if self.variant is not None else None
        if engine is None:
            raise UserError(f"this engine directory has no inputs_embeds variant of {Path(self.folder).name}; "
                            "re-export the model with textual-inversion support to use embeddings")
        table = token_table(str(Path(self.folder).parent / (Path(self.folder).name + "_embeds")))
        embeds = table[np.clip(rows, 0, table.shape[0] - 1)].astype(np.float32)
        for b, row in enumerate(splices):
            for position, vector in row.items():
                if position < embeds.shape[1]:
                    embeds[b, position] = vector
        return feed.run(engine, input_ids=torch.from_numpy(rows), inputs_embeds=torch.from_numpy(embeds))

    def vocabulary(self) -> prompt_compel.Vocabulary:
        t = self.text_tokenizer
        return prompt_compel.Vocabulary(lambda text: t.tokens(self.convert(text)), t.token_text, t.bos_id,
                                        t.eos_id, t.pad_id)

    def a1111_chunks(self, text: str) -> list[prompt_a1111.Chunk]:
        t = self.tokenizer
        find = self.inversions.find if self.inversions else None
        return prompt_a1111.chunk(prompt_a1111.parse_attention(text), t.tokens, t.bos_id, t.eos_id,
                                  t.token_id(",</w>"), find)

    def splices(self, chunk: prompt_a1111.Chunk) -> dict:
        out = {}
        for position, name in chunk.fixes:
            for j, vector in enumerate(self.inversions.by_name[name]):
                out[position + j] = vector
        return out


# ---- chunk counts (validation) ----------------------------------------------------------------------------

def chunk_count(syntax: str, encoders: Sequence[Encoder], text: str) -> int:
    """The 77-token chunks `text` needs under `syntax` (PromptSyntaxError for a compel prompt compel rejects)."""
    if syntax == "plain":
        return 1
    counts = [1]
    for enc in encoders:
        if syntax == "a1111":
            counts.append(len(enc.a1111_chunks(text)))
        else:
            counts.append(prompt_compel.chunk_count(prompt_compel.parse(text), enc.vocabulary()))
    return max(counts)


class _Planner:
    """Enough of an Encoder for chunk counting: a tokenizer and the embeddings, no engine."""

    outputs: dict = {}


def planners(tokenizers: Sequence, family: Family, embeddings: Sequence) -> list[Encoder]:
    return [Encoder(tok, _Planner(), family, embeddings=embeddings, index=i) for i, tok in enumerate(tokenizers)]


@functools.lru_cache(maxsize=16)
def folder_tokenizers(engine_dir: str, names: tuple[str, ...]) -> tuple:
    """The tokenizers of an engine directory's text encoders (cached: validation tokenizes every request)."""
    from sdrt.runtime.prompts.tokenizer import ClipTokenizer

    return tuple(ClipTokenizer.from_folder(Path(engine_dir) / ("tokenizer" if n == "text_encoder" else "tokenizer_2"))
                 for n in names)


# ---- encoding -----------------------------------------------------------------------------------------

def encode(family: Family, encoders: list[Encoder], prompts: list[str], negatives: list[str] | None, guided: bool,
           force_zeros_for_empty_prompt: bool, options: TextOptions = TextOptions()) -> Texts:
    """States for the prompts and (with guidance) the negative prompts, all [B, 77·k, C] for one k."""
    sdxl = is_sdxl(family)
    zero_negative = sdxl and negatives is None and force_zeros_for_empty_prompt
    neg_texts = negatives if negatives is not None else [""] * len(prompts)
    syntax, skip = options.syntax, options.clip_skip
    if syntax == "plain":
        pos, pooled = _plain(encoders, prompts, skip)
        neg, neg_pooled = (None, None) if not guided or zero_negative else _plain(encoders, neg_texts, 0)
    else:
        run = _a1111 if syntax == "a1111" else _compel
        texts = prompts + (neg_texts if guided and not zero_negative else [])
        states, pooled_all = run(encoders, texts, skip, options.chunks)
        pos, pooled = states[: len(prompts)], None if pooled_all is None else pooled_all[: len(prompts)]
        neg = states[len(prompts):] if len(texts) > len(prompts) else None
        neg_pooled = None if neg is None or pooled_all is None else pooled_all[len(prompts):]
    if guided and zero_negative:
        neg, neg_pooled = torch.zeros_like(pos), torch.zeros_like(pooled)
    return Texts(pos, neg if guided else None, pooled, neg_pooled if guided else None)


def _plain(encoders: list[Encoder], texts: list[str], skip: int):
    states, pooled = [], None
    for enc in encoders:
        ids, truncated = enc.text_tokenizer.encode([enc.convert(t) for t in texts])
        for dropped in truncated:
            if dropped:
                log.warning("The following part of your input was truncated because CLIP can only handle sequences "
                            "up to 77 tokens: %s", dropped)
        s, p = enc.run(ids, skip)
        states.append(s)
        pooled = p if p is not None else pooled
    return torch.cat(states, dim=-1), pooled


def _a1111(encoders: list[Encoder], texts: list[str], skip: int, chunks: int):
    per_encoder, pooled = [], None
    rows_per_encoder = [[enc.a1111_chunks(text) for text in texts] for enc in encoders]
    k = max([chunks] + [len(r) for rows in rows_per_encoder for r in rows])
    for enc, rows in zip(encoders, rows_per_encoder):
        t = enc.tokenizer
        empty = prompt_a1111.empty_chunk(t.bos_id, t.eos_id)
        zs = []
        for i in range(k):
            batch = [r[i] if i < len(r) else empty for r in rows]
            ids = [prompt_a1111.pad_after_end(c.ids, t.eos_id, t.pad_id) for c in batch]
            z, p = enc.run(ids, skip, [enc.splices(c) for c in batch] if enc.inversions else None)
            z = torch.stack([prompt_a1111.emphasize(z[b], torch.tensor(c.weights)) for b, c in enumerate(batch)])
            zs.append(z)
            if i == 0 and p is not None:
                pooled = p  # AUTOMATIC1111: the pooled vector of the first chunk
        per_encoder.append(torch.cat(zs, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


def _compel(encoders: list[Encoder], texts: list[str], skip: int, chunks: int):
    conjunctions = [prompt_compel.parse(text) for text in texts]
    pooled = None
    embedders = [prompt_compel.Embedder(enc.vocabulary(), lambda ids, enc=enc: enc.run(ids, skip)[0])
                 for enc in encoders]
    per_encoder = [[embedder(c) for c in conjunctions] for embedder in embedders]
    length = max([chunks * encoders[0].tokenizer.max_length] + [z.shape[0] for zs in per_encoder for z in zs])
    per_encoder = [torch.stack([e.pad(z, length) for z in zs]) for e, zs in zip(embedders, per_encoder)]
    for enc in encoders:
        if "text_embeds" in enc.engine.outputs:  # compel: the pooled vector of the raw text, truncated
            ids, _ = enc.text_tokenizer.encode([enc.convert(t) for t in texts])
            pooled = enc.run(ids, 0)[1]
    return torch.cat(per_encoder, dim=-1), pooled


# ---- validation ---------------------------------------------------------------------------------------

MAX_CHUNKS = 16  # 1,200 prompt tokens; each chunk adds 77 keys to every cross-attention of every step


def layer_count(model_dir) -> int | None:
    """The fewest hidden layers among the model's text encoders (from their config.json), None if unknown."""
    import json

    counts = []
    for name in model_dir.text_encoder_names:
        try:
            counts.append(int(json.loads((model_dir.path / name / "config.json").read_text())["num_hidden_layers"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return min(counts) if counts else None


def validate_text(prompt_group, model_dir, prompts: Sequence[str], negatives: Sequence[str] | None,
                  embeddings_dir=None, embeddings: Sequence = ()) -> TextOptions:
    """The Prompt group's syntax, clip skip and embeddings checked against the model, and the job's chunk count.
    `embeddings_dir` (every file in it) and `embeddings` (files or names) come from the pipeline; the request's
    own `embeddings` add to them."""
    from sdrt.runtime.prompts import embeddings as ti

    info = getattr(model_dir, "info", None)
    # SD3, FLUX.1: diffusers' own encoding, no clip skip or embeddings; Layout.flow_syntaxes says which syntaxes
    # run besides plain (FLUX.1: a1111, the default, and compel); elsewhere a1111 runs as plain, compel is refused
    plain_only = info is not None and info.layout.plain_prompts_only
    flow = info.layout.flow_syntaxes if plain_only else ()
    syntax = getattr(prompt_group, "syntax", None) or ((flow or ("plain",))[0] if plain_only else DEFAULT_SYNTAX)
    if not isinstance(syntax, str) or syntax.strip().lower() not in SYNTAXES:
        raise InvalidRequest("prompt_syntax", f"unknown prompt syntax {syntax!r}; choose one of {', '.join(SYNTAXES)}")
    syntax = syntax.strip().lower()
    skip = getattr(prompt_group, "clip_skip", 0)
    skip = 0 if skip is None else fields.integer("clip_skip", skip, 0)
    length = getattr(prompt_group, "max_sequence_length", None)
    default_length = 512 if info is not None and info.family.value == "flux" else 256  # FluxPipeline's: 512
    length = default_length if length is None else fields.integer("max_sequence_length", length, 1, 512)
    if plain_only:
        refused = syntax == "compel" and syntax not in flow
        given = [(n, v) for n, v in (("prompt_syntax", refused), ("clip_skip", skip),
                                     ("embeddings", getattr(prompt_group, "embeddings", ()) or embeddings
                                      or embeddings_dir)) if v]
        if given:
            raise InvalidRequest(given[0][0], f"{info.family.value} models take plain prompts (diffusers' own "
                                              f"encoding){''.join(' or ' + s for s in flow)}: "
                                              "no other prompt syntax, clip skip or embeddings yet")
        if syntax == "compel":
            for text in prompts:
                try:
                    flux_compel.parse(text)
                except prompt_compel.PromptSyntaxError as e:
                    raise InvalidRequest("prompt", f"{e} (prompt syntax compel)") from None
        return TextOptions(syntax if syntax in flow else "plain", 0, 1, (), length)
    layers = layer_count(model_dir)
    if layers is not None and skip >= layers:
        raise InvalidRequest("clip_skip", f"must be below the text encoder's {layers} layers (0 … {layers - 1}; "
                                          f"got {skip})")
    wanted = getattr(prompt_group, "embeddings", ()) or ()
    if isinstance(wanted, str) or not isinstance(wanted, (list, tuple)) or \
            not all(isinstance(w, str) for w in wanted):
        raise InvalidRequest("embeddings", "must be a list of embedding files or names")
    found = ()
    if wanted or embeddings or embeddings_dir:
        try:
            found = ti.resolve(tuple(embeddings) + tuple(wanted), embeddings_dir, ti.slots_for(model_dir))
        except ti.EmbeddingError as e:
            raise InvalidRequest("embeddings", str(e)) from None
    chunks = 1
    if syntax != "plain":
        tokenizers = folder_tokenizers(str(model_dir.path), tuple(model_dir.text_encoder_names))
        encoders = planners(tokenizers, model_dir.info.family, found)
        for field, texts in (("prompt", prompts), ("negative_prompt", negatives or ())):
            for text in texts:
                try:
                    chunks = max(chunks, chunk_count(syntax, encoders, text))
                except prompt_compel.PromptSyntaxError as e:
                    raise InvalidRequest(field, f"{e} (prompt syntax {syntax})") from None
        if chunks > MAX_CHUNKS:
            raise InvalidRequest("prompt", f"needs {chunks} chunks of 75 tokens; at most {MAX_CHUNKS} "
                                           f"({MAX_CHUNKS * prompt_a1111.CHUNK_TOKENS} tokens) per prompt")
    return TextOptions(syntax, skip, chunks, found, length)


class TextSetup:
    """A pipeline's text settings: its embeddings (a folder whose files are all active, and files given at load)
    and the text encoders' inputs_embeds variants, each opened on its first use."""

    def __init__(self, embeddings_dir=None, embeddings: Sequence = (), open_engine=None):
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None
        self.embeddings = tuple(str(e) for e in embeddings)
        self._open = open_engine  # onnx path → engine, on the pipeline's backend
        self._variants: dict = {}

    def check(self, model_dir) -> None:
        """Bad embedding files fail at load, before any request."""
        from sdrt.runtime.prompts import embeddings as ti

        if self.embeddings or self.embeddings_dir:
            ti.resolve(self.embeddings, self.embeddings_dir, ti.slots_for(model_dir))

    def validate_args(self) -> dict:
        return {"embeddings_dir": self.embeddings_dir, "embeddings": self.embeddings}

    def variant(self, model_dir, name: str, loras: Sequence = ()):
        """() → the inputs_embeds variant of text encoder `name`; `loras`: LoRAs the job applies to that encoder,
        which the variant does not carry (runtime/lora/adapters.py adapts the plain encoders only)."""
        def get():
            if loras:
                from sdrt.runtime.errors import UserError

                raise UserError(f"embeddings in prompts cannot be combined yet with LoRAs that change {name} "
                                f"({', '.join(str(getattr(r, 'name', r)) for r in loras)})")
            if name not in self._variants:
                path = model_dir.path / (name + "_embeds") / "model.onnx"
                self._variants[name] = self._open(path) if self._open is not None and path.is_file() else None
            return self._variants[name]
        return get
