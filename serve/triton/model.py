"""Triton Python-backend model over sdrt's batching service (`sdrt triton-repo` copies this file to NAME/1/model.py).

One model instance = one Python process = one `sdrt.runtime.service.Service` (one worker owning the engines).
Triton's dynamic batcher hands `execute()` a list of requests; each request may carry several rows (its inputs
have a leading batch dimension), each row one image. `execute()` validates every row, submits them all to the
service (which regroups them by compatibility key — size, steps, sampler, guidance on/off … — into engine batches),
then answers each Triton request with its images or with its own error. Nothing a request sends can bring the
model down: every failure becomes that request's TritonError.

config.pbtxt parameters (all strings): `engine_dir` (absolute, or relative to this file's folder), `backend`
(auto | ort-cpu | ort-cuda | tensorrt | torch; auto picks ort-cpu on CPU instances), `max_wait_ms` (the
service's own batch gathering) and `request_timeout_s` (deadline of a request once it reached the model).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

try:  # present inside Triton's Python backend only; the helpers below are importable without it
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton
    pb_utils = None

# Triton input → (Request.of flat key, kind)
INPUTS = {
    "prompt": ("prompt", "text"),
    "negative_prompt": ("negative_prompt", "text"),
    "seed": ("seed", "int"),
    "steps": ("steps", "int"),
    "guidance_scale": ("guidance", "float"),
    "width": ("width", "int"),
    "height": ("height", "int"),
    "sampler": ("sampler", "text"),
}
FIELD_NAMES = {flat: name for name, (flat, _) in INPUTS.items()}  # InvalidRequest field → Triton input name
POLL_S = 0.25  # how often a waiting execute() looks for cancelled requests


class RowError(Exception):
    """A request's input that cannot become a Request (bad shape, bad UTF-8, …)."""


def _values(name: str, array: np.ndarray, kind: str) -> list:
    """One Python value per row from a [rows, 1] (or [rows]) input tensor."""
    a = np.asarray(array)
    if a.ndim == 0:
        a = a.reshape(1)
    elif a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim != 1:
        raise RowError(f"{name}: must hold one value per row, shape [rows, 1] (got {list(a.shape)})")
    out = []
    for v in a.tolist():
        if kind == "text":
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise RowError(f"{name}: is not UTF-8 text") from None
            elif not isinstance(v, str):
                raise RowError(f"{name}: must be a string (BYTES), not {type(v).__name__}")
        elif kind == "int":
            if isinstance(v, float):  # only when a client sends a float tensor Triton let through
                raise RowError(f"{name}: must be an integer, not {v!r}")
            v = int(v)
        else:
            v = float(v)
        out.append(v)
    return out


def rows_of(inputs: dict[str, np.ndarray]) -> list[dict]:
    """{Triton input name: array} → one Request.of(**row) keyword dict per row."""
    if "prompt" not in inputs:
        raise RowError("prompt: is required (a BYTES tensor of shape [rows, 1])")
    columns = {}
    for name, array in inputs.items():
        if name not in INPUTS:
            raise RowError(f"{name}: is not an input of this model; known: {', '.join(INPUTS)}")
        flat, kind = INPUTS[name]
        columns[flat] = _values(name, array, kind)
    count = len(columns["prompt"])
    if count == 0:
        raise RowError("prompt: holds no rows")
    for flat, values in columns.items():
        if len(values) != count:
            raise RowError(f"{FIELD_NAMES[flat]}: has {len(values)} rows, prompt has {count}")
    rows = []
    for i in range(count):
        row = {flat: values[i] for flat, values in columns.items()}
        if row.get("sampler") == "":
            row.pop("sampler")  # an empty sampler means the model's own
        rows.append(row)
    return rows


def client_mistake(error: BaseException) -> bool:
    """A bad input (a field the client got wrong, a row that does not fit), not a failure of the server."""
    from sdrt.runtime.fields import InvalidRequest

    return isinstance(error, (InvalidRequest, RowError))


def triton_error(message: str, invalid: bool):
    """pb_utils.TritonError with INVALID_ARG for a client's mistake, so Triton answers it 400 and clients that retry
    server errors do not retry it; Python backends without error codes get the message alone."""
    if invalid and hasattr(pb_utils.TritonError, "INVALID_ARG"):
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(message)


def error_text(error: BaseException, row: int | None) -> str:
    """The message a client sees: InvalidRequest fields named as this model's inputs, a row index when it has many."""
    from sdrt.runtime.errors import UserError
    from sdrt.runtime.fields import InvalidRequest

    if isinstance(error, InvalidRequest):
        text = f"{FIELD_NAMES.get(error.field, error.field)}: {error.message}"
    elif isinstance(error, (UserError, RowError)):
        text = str(error)
    else:  # an engine or internal error: name its type, it is not the client's fault
        text = f"internal error ({type(error).__name__}): {error}"
    text = " ".join(text.split())
    return text if row is None else f"row {row}: {text}"


class _Pending:
    """One Triton request on its way: its futures (one per row) and cancel tokens, or its error."""

    def __init__(self, request):
        self.request = request
        self.futures: list = []
        self.tokens: list = []
        self.error: str | None = None
        self.invalid = False  # the client's mistake (a bad input): answered as Triton's INVALID_ARG, HTTP 400


class TritonPythonModel:
    def initialize(self, args):
        from sdrt.runtime.pipeline import Pipeline
        from sdrt.runtime.service import Service

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        engine = Path(params.get("engine_dir", "engine"))
        if not engine.is_absolute():
            engine = Path(__file__).resolve().parent / engine
        kind = str(args.get("model_instance_kind", "CPU")).upper()
        backend = params.get("backend") or "auto"
        ort_config = None
        if kind == "GPU":
            device = int(args.get("model_instance_device_id", 0) or 0)
            import torch

            from sdrt.engines.ort import OrtConfig

            if torch.cuda.is_available():
                torch.cuda.set_device(device)
            ort_config = OrtConfig(device_id=device)
        elif backend == "auto":
            backend = "ort-cpu"
        self.max_batch = max(int(config.get("max_batch_size", 1) or 1), 1)
        self.warmed: list[int] = []  # image counts of the warm-up batches run in initialize()
        self.request_timeout = float(params.get("request_timeout_s") or 300)
        pipeline = Pipeline.load(engine, backend=backend, ort_config=ort_config)
        # Triton's dynamic batcher has gathered the batch already: the service only needs to see all of one
        # execute()'s rows at once, which it does since they are submitted together.
        self.service = Service(pipeline, max_batch=self.max_batch, max_wait_ms=float(params.get("max_wait_ms") or 5),
                               queue_size=max(4 * self.max_batch, 16))
        self.service.wait_ready(60)
        warmup = params.get("warmup")
        if warmup:  # Triton reports ready only after initialize() returns: ready means warm
            from sdrt.runtime.request import Request

            width, height = (int(v) for v in warmup.split("x"))
            for images in sorted({1, self.max_batch}):
                self.service.generate(Request.of(prompt="warm-up", steps=1, guidance=0.0, width=width,
                                                 height=height, batch=images))
                self.warmed.append(images)
        if pb_utils is not None and hasattr(pb_utils, "Logger"):
            pb_utils.Logger.log_info(f"sdrt: {args.get('model_instance_name')} serves {engine} on {backend}, "
                                     f"{self.max_batch} images per engine batch; warm-up batches {self.warmed}")

    # ---- one Triton batch ------------------------------------------------------------------------------------
    def _inputs(self, request) -> dict[str, np.ndarray]:
        inputs = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return inputs

    def _submit(self, requests) -> list[_Pending]:
        from sdrt.runtime.request import Request
        from sdrt.runtime.service import CancelToken

        pending, jobs = [], []
        for request in requests:  # validate every row first, so that submission below is one quick burst
            p = _Pending(request)
            pending.append(p)
            rows, row = [], None
            try:
                rows = rows_of(self._inputs(request))
                validated = []
                for row, values in enumerate(rows):
                    validated.append(self.service.validate(Request.of(**values)))
                row = None
                if len({(j.width, j.height) for j in validated}) > 1:
                    raise RowError("width/height: the rows of one request must share a size (one [rows, H, W, 3] "
                                   "image tensor); send other sizes as separate requests")
                jobs.append((p, validated))
            except Exception as e:  # noqa: BLE001 — this request's own error
                p.error = error_text(e, row if len(rows) > 1 else None)
                p.invalid = client_mistake(e)
        for p, validated in jobs:
            try:
                for job in validated:
                    token = CancelToken()
                    p.tokens.append(token)
                    p.futures.append(self.service.submit(job, timeout=self.request_timeout, cancel=token))
            except Exception as e:  # noqa: BLE001 — QueueFull, ServiceClosed: this request fails, others go on
                for token in p.tokens:
                    token.cancel()
                for f in p.futures:
                    f.cancel()
                p.error = error_text(e, None)
        return pending

    def _wait(self, pending: list[_Pending]) -> None:
        """Wait for every row; cancel the rows of a request whose client went away. Bounded by the deadline."""
        futures = {f for p in pending for f in p.futures}
        until = time.monotonic() + self.request_timeout + 30
        while futures and time.monotonic() < until:
            done, futures = wait(futures, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for p in pending:
                if p.error is None and p.futures and not all(f.done() for f in p.futures):
                    try:
                        cancelled = p.request.is_cancelled()
                    except Exception:  # noqa: BLE001 — older backends lack is_cancelled()
                        cancelled = False
                    if cancelled:
                        for token in p.tokens:
                            token.cancel()

    def _respond(self, p: _Pending):
        if p.error is None:
            images, seeds = [], []
            for row, future in enumerate(p.futures):
                if not future.done():  # past _wait's bound: give up on this request, the service drops its rows
                    for token in p.tokens:
                        token.cancel()
                    p.error = f"the request did not finish within {self.request_timeout:g} s"
                    break
                try:
                    result = future.result(timeout=0)
                    images.extend(np.asarray(image.convert("RGB"), dtype=np.uint8) for image in result.images)
                    seeds.extend(result.seeds)
                except Exception as e:  # noqa: BLE001 — Cancelled, DeadlineExceeded, engine errors, timeout
                    p.error = error_text(e, row if len(p.futures) > 1 else None)
                    break
        if p.error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(p.error, p.invalid))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("image", np.ascontiguousarray(np.stack(images))),
            pb_utils.Tensor("seed", np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)),
        ])

    def execute(self, requests):
        try:
            pending = self._submit(requests)
            self._wait(pending)
        except Exception as e:  # noqa: BLE001 — never let an exception take the whole batch (or the model) down
            text = error_text(e, None)
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(text))
                    for _ in requests]
        responses = []
        for p in pending:
            try:
                responses.append(self._respond(p))
            except Exception as e:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(error_text(e, None))))
        return responses

    def finalize(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close(drain=False, timeout=30)
