"""`sdrt serve` and `sdrt triton-repo`: an engine directory over HTTP, or as a Triton model repository.

The server (FastAPI, uvicorn) and the repository writer are imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdrt.runtime.errors import UserError


def triton_repo(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    output: Path = typer.Option(..., "-o", "--output", help="model repository to write (Triton's --model-repository)"),
    name: Optional[str] = typer.Option(None, help="model name (default: the engine directory's name)"),
    max_batch: int = typer.Option(4, help="Triton's max_batch_size: images per engine batch"),
    instances: int = typer.Option(1, help="model instances (one Python process each) per device"),
    kind: str = typer.Option("auto", help="cpu|gpu|auto: the instance group's kind (auto: GPU where Triton sees one)"),
    backend: str = typer.Option("auto", help="sdrt backend inside the model: auto|tensorrt|ort-cuda|ort-cpu|torch"),
    copy_engine: bool = typer.Option(False, "--copy-engine", help="copy the engine directory into the repository "
                                                                  "instead of naming its absolute path"),
    queue_delay_ms: float = typer.Option(10.0, help="how long Triton's dynamic batcher gathers a batch"),
    queue_timeout: float = typer.Option(300.0, help="seconds a request may wait in Triton's queue before it is rejected"),
    max_queue_size: int = typer.Option(64, help="requests Triton queues before it rejects new ones"),
    warmup: bool = typer.Option(True, help="add model_warmup, so that the model is ready only once warm"),
    force: bool = typer.Option(False, help="write into a non-empty repository (replacing NAME there)"),
) -> None:
    """Write a Triton model repository whose Python-backend model drives sdrt's batching service."""
    from sdrt.serve.triton.repo import RepoOptions, write_repo

    written = write_repo(RepoOptions(engine_dir=engine_dir, repo=output, name=name, max_batch=max_batch,
                                     instances=instances, kind=kind, backend=backend, copy_engine=copy_engine,
                                     force=force, queue_delay_ms=queue_delay_ms, queue_timeout_s=queue_timeout,
                                     max_queue_size=max_queue_size, warmup=warmup))
    print(written.model_dir)


def serve(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    host: str = typer.Option("127.0.0.1", help="address to bind; the default answers this machine only"),
    port: int = typer.Option(7860, help="port to listen on (0: any free port; the URL printed says which)"),
    max_batch: int = typer.Option(4, help="images per engine batch (concurrent compatible requests share it)"),
    max_wait_ms: float = typer.Option(10.0, help="how long a request waits for batch-mates"),
    queue_size: int = typer.Option(64, help="queued requests; more are answered 429 with Retry-After"),
    timeout_s: float = typer.Option(300.0, help="per-request deadline in seconds, queue wait included; 504 past "
                                                "it (0: none)"),
    api_key_env: Optional[str] = typer.Option(None, help="environment variable holding an API key; clients then "
                                                         "send `Authorization: Bearer KEY`"),
    max_body_mb: float = typer.Option(32.0, help="largest request body in MiB; 413 above"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    warmup: bool = typer.Option(True, help="run one small generation before /readyz reports ready"),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical|error|warning|info|debug"),
    lora_dir: Optional[Path] = typer.Option(None, help="folder of LoRA .safetensors files that requests may name "
                                                       "(`loras`, `<lora:NAME:SCALE>`), by file stem"),
    embeddings_dir: Optional[Path] = typer.Option(None, help="folder of textual inversions every prompt may use "
                                                             "(trigger word: the file's stem)"),
    face_models: Optional[Path] = typer.Option(None, help="folder of insightface's ONNX models (antelopev2 / buffalo_l: "
                                                          "non-commercial research licence) that read faces from "
                                                          "photos for InstantID, PhotoMaker v2 and PuLID requests"),
    api_auth_env: Optional[str] = typer.Option(None, help="environment variable holding AUTOMATIC1111-style "
                                                          "credentials, user:password[,user2:password2]; clients "
                                                          "then send HTTP Basic (beside --api-key-env, either works)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients see (OpenAI `model`, /v1/models, "
                                                        "AUTOMATIC1111's sd_model_checkpoint) [default: the engine "
                                                        "directory's name]"),
) -> None:
    """Serve an engine directory over HTTP: OpenAI Images, AUTOMATIC1111's /sdapi/v1, health and metrics.

    One batching service per process; SIGTERM lets in-flight requests finish and exits 0.
    """
    import os

    from sdrt.runtime.loader import open_dir
    from sdrt.serve.app import serve as run_server
    from sdrt.serve.edge import ServeConfig

    if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or max_body_mb <= 0 or timeout_s < 0:
        raise UserError("--max-batch and --queue-size must be at least 1, --max-wait-ms and --timeout-s at least 0, "
                        "--max-body-mb above 0")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    api_auth = ()
    if api_auth_env:
        from sdrt.serve.edge import parse_api_auth

        if not os.environ.get(api_auth_env):
            raise UserError(f"--api-auth-env {api_auth_env}: that environment variable is not set or empty")
        try:
            api_auth = parse_api_auth(os.environ[api_auth_env])
        except UserError as e:
            raise UserError(f"--api-auth-env {api_auth_env}: {e}") from None
    open_dir(engine_dir)  # a folder that is no engine directory fails here, before binding
    for flag, folder in (("--lora-dir", lora_dir), ("--embeddings-dir", embeddings_dir), ("--face-models", face_models)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{flag} {folder}: not a directory; give the folder that holds the files")
    config = ServeConfig(engine_dir=engine_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                         timeout_s=timeout_s or None, api_key=api_key, max_body_bytes=int(max_body_mb * 2 ** 20),
                         backend=backend, warmup=warmup, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                         face_models=face_models,
                         model_name=model_name or None, api_auth=api_auth)
    code = run_server(config, host=host, port=port, log_level=log_level,
                      announce=lambda line: print(line, flush=True))
    if code:
        raise typer.Exit(code)
