"""The conditioning kinds, in the order they are validated and attached (DESIGN.md §2a). Each module listed is a Kind:

    NAME, FIELD                                    its name (Job.uses, graphs.py) and the Job field of its use
    validate(request, model_dir, context) -> use   the request's inputs for it checked, or None when it asks for
                                                   none; the use's key() joins the batching key
    attach(parts, job, prepared) -> prepared       adds its contributor to the UNet call (runtime/denoiser/call.py)

Adding a kind adds its module here, its graph to graphs.py and its field to runtime/job.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from sdrt.runtime.conditioning import controlnet, instantid, ip_adapter, photomaker, pulid, t2i_adapter

KINDS = (controlnet, ip_adapter, t2i_adapter, instantid, pulid,  # instantid after the others: it adds to their residuals and slots
         photomaker)  # photomaker last: it checks the others' graph takes its LoRA


@dataclass(frozen=True)
class Context:
    """What a kind's checks may need beyond its own request group."""

    width: int
    height: int
    loras: tuple = ()  # the request's LoRAs (runtime/lora/files.LoraRef): some graphs cannot take them
    earlier: Mapping[str, object] = field(default_factory=dict)  # the uses of the kinds validated before it, by NAME
