"""PhotoMaker v2's ID path (reference/identity.md §2; PhotoMaker model_v2.py and resampler.py at 060b4fcb), re-stated
with every width read from the weights, for `photomaker/id_encoder` of a v2 file (export/extras/photomaker.py).

ID embeddings per photo = QFormerPerceiver(a, h): a = insightface's raw ArcFace `embedding` [N, 512], h = the CLIP
tower's last_hidden_state [N, 257, W] (before its post-layernorm); x = LN(token_proj(a)) reshaped to [N, T, D]
(token_proj = Linear → GELU → Linear, T = 2); out = x + FacePerceiverResampler(x, h): proj_in W → D, `depth`
blocks of [perceiver attention (heads × 128; q from LN(latents), k/v from LN(proj_in h) ‖ LN(latents)) + latents,
FF(LN → Linear → GELU → Linear, no biases) + latents], proj_out, LN. The CLIP projections are in the file, unused.
State-dict names follow model_v2.py (`qformer_perceiver.token_proj.{0,2}`, `.token_norm`, `.perceiver_resampler.
{proj_in, proj_out, norm_out, layers.i.0.{norm1, norm2, to_q, to_kv, to_out}, layers.i.1.{0, 1, 3}}`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdrt.runtime.errors import UserError

DIM_HEAD = 128  # model_v2.py: FacePerceiverResampler(dim_head=128, heads=cross_attention_dim // 128)
PREFIX = "qformer_perceiver."


class _Attention(torch.nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)
        self.heads = inner // DIM_HEAD

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, DIM_HEAD).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))  # scale 1/√128
        return self.to_out(out.transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1))


def _feed_forward(dim: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, hidden, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(hidden, dim, bias=False))


class _Resampler(torch.nn.Module):
    def __init__(self, dim: int, width: int, inner: int, hidden: int, depth: int):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(width, dim), torch.nn.Linear(dim, dim)
        self.norm_out = torch.nn.LayerNorm(dim)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([_Attention(dim, inner), _feed_forward(dim, hidden)])
                                          for _ in range(depth))

    def forward(self, latents, context):
        context = self.proj_in(context)
        for attention, ff in self.layers:
            latents = attention(context, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(torch.nn.Module):
    def __init__(self, face: int, face_hidden: int, dim: int, tokens: int, width: int, inner: int, hidden: int,
                 depth: int):
        super().__init__()
        self.token_proj = torch.nn.Sequential(torch.nn.Linear(face, face_hidden), torch.nn.GELU(),
                                              torch.nn.Linear(face_hidden, dim * tokens))
        self.token_norm = torch.nn.LayerNorm(dim)
        self.perceiver_resampler = _Resampler(dim, width, inner, hidden, depth)
        self.tokens, self.dim = tokens, dim

    def forward(self, face_embeds, hidden_states):
        x = self.token_norm(self.token_proj(face_embeds).reshape(-1, self.tokens, self.dim))
        return x + self.perceiver_resampler(x, hidden_states)


class IdEncoderV2(torch.nn.Module):
    """(photos [N, 3, S, S], ArcFace embeddings [N, 512]) → ID embeddings [N, T, D]."""

    def __init__(self, clip, qformer: QFormerPerceiver):
        super().__init__()
        self.clip, self.qformer_perceiver = clip, qformer

    def forward(self, id_pixel_values, face_embeds):
        hidden = self.clip.vision_model(id_pixel_values)[0]  # last_hidden_state, before the post-layernorm
        return self.qformer_perceiver(face_embeds, hidden)


def build(clip, ids: dict, what: str) -> IdEncoderV2:
    """The v2 encoder over `clip` (its tower loaded) from the file's qformer_perceiver.* tensors."""
    state = {k[len(PREFIX):]: v.float() for k, v in ids.items() if k.startswith(PREFIX)}
    try:
        face_hidden, face = state["token_proj.0.weight"].shape
        dim = state["token_norm.weight"].shape[0]
        tokens = state["token_proj.2.weight"].shape[0] // dim
        width = state["perceiver_resampler.proj_in.weight"].shape[1]
        inner = state["perceiver_resampler.layers.0.0.to_q.weight"].shape[0]
        hidden = state["perceiver_resampler.layers.0.1.1.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("perceiver_resampler.layers."))
        qformer = QFormerPerceiver(face, face_hidden, dim, tokens, width, inner, hidden, depth)
        qformer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{what}: its qformer_perceiver is not PhotoMaker v2's ({first})") from None
    if inner % DIM_HEAD or width != clip.config.hidden_size:
        raise UserError(f"{what}: its qformer_perceiver does not fit its CLIP tower (attention {inner} wide in "
                        f"{DIM_HEAD}-wide heads, context {width} against the tower's {clip.config.hidden_size})")
    return IdEncoderV2(clip, qformer).eval()
