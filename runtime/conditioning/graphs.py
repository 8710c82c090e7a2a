"""Which exported UNet graph serves which combination of conditioning kinds: the one table (DESIGN.md §2a).

Each graph is the model's UNet traced with the extra inputs its kinds feed (export/extras/controlnet.py,
ip_adapter.py, t2i_adapter.py) and holds the same UNet weights. `lora` says whether the graph has a weights map
that follows the UNet's, so a LoRA's "unet" deltas reach it (runtime/lora/adapters.py); unet_t2i is traced at the
adapter's sizes, where the weights map cannot follow the up-samplers. A combination missing here is refused when
the request is validated.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTROLNET, IP_ADAPTER, T2I_ADAPTER = "controlnet", "ip_adapter", "t2i_adapter"  # the kinds' names (Job.uses)
INSTANTID = "instantid"  # IdentityNet's residuals and its adapter's face tokens: the ControlNet + IP-Adapter UNet
PHOTOMAKER = "photomaker"  # the prompt's class rows fused with the ID: no graph of its own (PROMPT_KINDS)
PROMPT_KINDS = frozenset({PHOTOMAKER})  # kinds that change only the text conditioning: any graph serves them
PULID = "pulid"  # PuLID's ID tokens into its own ID attention (export/extras/pulid.py)


@dataclass(frozen=True)
class Graph:
    name: str  # the component folder in the engine directory
    kinds: frozenset[str]
    lora: bool  # LoRA deltas for the UNet apply to it through its own weights map


GRAPHS = (
    Graph("unet", frozenset(), lora=True),
    Graph("unet_controlnet", frozenset({CONTROLNET}), lora=True),
    Graph("unet_ip", frozenset({IP_ADAPTER}), lora=True),
    Graph("unet_controlnet_ip", frozenset({CONTROLNET, IP_ADAPTER}), lora=True),
    Graph("unet_t2i", frozenset({T2I_ADAPTER}), lora=False),
    *(Graph("unet_controlnet_ip", frozenset({INSTANTID, *more}), lora=True)
      for more in ((), (CONTROLNET,), (IP_ADAPTER,), (CONTROLNET, IP_ADAPTER))),
    Graph("unet_pulid", frozenset({PULID}), lora=True),
)
UNET_VARIANTS = tuple(dict.fromkeys(g.name for g in GRAPHS if g.kinds))  # the graphs besides the plain UNet
LORA_UNET_VARIANTS = tuple(dict.fromkeys(g.name for g in GRAPHS if g.kinds and g.lora))


def graph_for(kinds) -> str:
    """The graph that takes every kind in `kinds` (and no other), e.g. {"controlnet", "ip_adapter"} →
    unet_controlnet_ip."""
    wanted = frozenset(kinds) - PROMPT_KINDS
    for graph in GRAPHS:
        if graph.kinds == wanted:
            return graph.name
    served = "; ".join(" + ".join(sorted(g.kinds)) for g in GRAPHS if g.kinds)
    raise ValueError(f"no exported graph takes {' + '.join(sorted(wanted))} together (graphs exist for: {served})")
