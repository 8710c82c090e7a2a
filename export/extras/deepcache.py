"""Step caching (DeepCache, branch 0) as two UNet graphs beside the plain one (../shared/reference/customization.md §6.1).

`unet_deepcache`: the UNet, plus `deep_feature`: the hidden state entering the last layer (resnet [+ transformer])
of the last up block — the output of the layer before it, [B, C₀, h, w] with C₀ = block_out_channels[0].
`unet_deepcache_shallow`: what DeepCacheSDHelper still computes on a cached step with cache_branch_id 0 — the time
(and SDXL added) embedding, conv_in, the last up block's last layer on cat(deep_feature, conv_in output), then
conv_norm_out / conv_act / conv_out. Every deeper module returns the full step's cached output in the helper, and
the only one of them the last layer reads is the layer before it: so the two graphs compute what the helper does.
"""

from __future__ import annotations

import torch

from sdrt.export.components import ComponentSpec, Shape, _unet_spec

FULL, SHALLOW = "unet_deepcache", "unet_deepcache_shallow"


def _last_layers(unet):
    """The last up block's (previous, last) layers: attentions when it has them, else resnets."""
    block = unet.up_blocks[-1]
    layers = block.attentions if getattr(block, "attentions", None) else block.resnets
    return layers[-2], block.resnets[-1], (block.attentions[-1] if getattr(block, "attentions", None) else None)


class _Full(torch.nn.Module):
    def __init__(self, unet, with_added_cond: bool):
        super().__init__()
        self.unet = unet
        self.with_added_cond = with_added_cond

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        captured = []
        previous, _, _ = _last_layers(self.unet)
        handle = previous.register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))
        try:
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.with_added_cond else None
            out = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        finally:
            handle.remove()
        return out, captured[-1]


class _Shallow(torch.nn.Module):
    def __init__(self, unet, names: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.names = names  # the graph's inputs, in order (encoder_hidden_states only when the last layer attends)

    def forward(self, *args):
        x = dict(zip(self.names, args))
        unet = self.unet  # UNet2DConditionModel.forward, steps 1, 2 and the last up block's last layer, 6
        sample, timestep, ehs = x["sample"], x["timestep"], x.get("encoder_hidden_states")
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if "text_embeds" in x:
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs,
                                           added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        skip = unet.conv_in(sample)
        _, resnet, attention = _last_layers(unet)
        hidden = resnet(torch.cat([x["deep_feature"], skip], dim=1), emb)  # UpBlock2D: cat(hidden, res_hidden)
        if attention is not None:
            hidden = attention(hidden, encoder_hidden_states=ehs, return_dict=False)[0]
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def feature_channels(pipe) -> int:
    return pipe.unet.config.block_out_channels[0]


def deepcache_specs(pipe) -> dict[str, ComponentSpec]:
    plain = _unet_spec(with_added_cond=pipe.unet.config.addition_embed_type == "text_time")
    added = "text_embeds" in plain.input_names
    feature_axes = {0: "batch_size", 2: "height", 3: "width"}

    attends = _last_layers(pipe.unet)[2] is not None
    names = ("sample", "timestep") + (("encoder_hidden_states",) if attends else ()) + ("deep_feature",) + \
        plain.input_names[3:]

    def shallow_inputs(p, shape: Shape, dtype):
        base = dict(zip(plain.input_names, plain.make_inputs(p, shape, dtype)))
        g = torch.Generator().manual_seed(shape.batch * 7 + shape.latent_width)
        base["deep_feature"] = torch.randn(shape.batch, feature_channels(p), shape.latent_height, shape.latent_width,
                                           generator=g).to(dtype)
        return tuple(base[n] for n in names)

    axes = {k: v for k, v in plain.dynamic_axes.items() if k in names or k == "out_sample"}
    return {
        FULL: ComponentSpec(FULL, plain.input_names, ("out_sample", "deep_feature"),
                            plain.dynamic_axes | {"deep_feature": feature_axes}, lambda p: _Full(p.unet, added),
                            plain.make_inputs, ("timestep",)),
        SHALLOW: ComponentSpec(SHALLOW, names, ("out_sample",), axes | {"deep_feature": feature_axes},
                               lambda p: _Shallow(p.unet, names), shallow_inputs, ("timestep",)),
    }
