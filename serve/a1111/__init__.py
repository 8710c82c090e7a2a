"""The AUTOMATIC1111 dialect of `sdrt serve`: `/sdapi/v1` and the ControlNet extension's `/controlnet` routes.

routes.py holds the routes and the answers; fields.py turns txt2img/img2img bodies into Plans; controlnet.py reads
the ControlNet extension's units (`alwayson_scripts.controlnet.args`) and answers its model and module lists;
progress.py is progress, interrupt and skip. The names other modules import from `sdrt.serve.a1111` are re-exported
here.
"""

from sdrt.serve.a1111.fields import A1111_IMG2IMG_USED, A1111_SCHEDULERS, A1111_USED, a1111_neutral, a1111_plan
from sdrt.serve.a1111.progress import Progress
from sdrt.serve.a1111.routes import a1111_response, a1111_samplers, a1111_schedulers, add_routes

__all__ = ["A1111_USED", "A1111_IMG2IMG_USED", "A1111_SCHEDULERS", "Progress", "a1111_neutral", "a1111_plan",
           "a1111_response", "a1111_samplers", "a1111_schedulers", "add_routes"]
