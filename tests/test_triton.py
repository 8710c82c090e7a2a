"""`sdrt triton-repo` and its Python-backend model, on a real tritonserver.

The server is the `tritonserver` binary that PyPI's nvidia-pytriton wheel ships (reference/serving.md §6), run
on loopback ports with a backend folder of our own (the wheel's Python backend plus the stub for this
interpreter). One server per module; it is stopped (its whole process group) whatever the tests do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import UserError
from sdrt.serve.triton import model as triton_model
from sdrt.serve.triton.repo import RepoOptions, write_repo

from conftest import run_sdrt

NAME = "sd15"
GOOD = dict(steps=2, width=32, height=32, sampler="euler_a")  # guidance: the model's default (7.5)


# ---- the writer (no server) ------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".sdrt-tmp")]


def test_writer_lays_out_the_repository(exported, tmp_path):
    engine = exported("sd15", "fp32")
    written = write_repo(RepoOptions(engine_dir=engine, repo=tmp_path / "repo", name=NAME, max_batch=8,
                                     instances=2, kind="gpu"))
    model = tmp_path / "repo" / NAME
    assert written.model_dir == model
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == [
        "1", "1/model.py", "config.pbtxt"]
    assert (model / "1" / "model.py").read_text() == Path(triton_model.__file__).read_text()
    config = (model / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_batch_size: 8", "timeout_action: REJECT", "{ count: 2 kind: KIND_GPU }",
                 '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }',
                 '{ name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }',
                 f'parameters {{ key: "engine_dir" value: {{ string_value: "{engine.resolve()}" }} }}',
                 'parameters { key: "warmup" value: { string_value: "32x32" } }'):
        assert line in config
    for optional in ("negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "sampler"):
        assert f'{{ name: "{optional}" data_type:' in config and config.count("optional: true") == 7
    assert _leftovers(tmp_path) == []


def test_writer_copies_the_engine_and_replaces_only_its_model_with_force(exported, tmp_path):
    engine = exported("sd15", "fp32")
    repo = tmp_path / "repo"
    (repo / "other-model").mkdir(parents=True)
    with pytest.raises(UserError, match="not empty; pass --force"):
        write_repo(RepoOptions(engine_dir=engine, repo=repo, name=NAME))
    write_repo(RepoOptions(engine_dir=engine, repo=repo, name=NAME, force=True, copy_engine=True, warmup=False))
    (repo / NAME / "stale").write_text("from the first write")
    written = write_repo(RepoOptions(engine_dir=engine, repo=repo, name=NAME, force=True, copy_engine=True))
    assert sorted(p.name for p in repo.iterdir()) == ["other-model", NAME]
    assert not (repo / NAME / "stale").exists()
    assert (repo / NAME / "1" / "engine" / "unet" / "model.onnx").is_file()
    assert written.engine_dir == "engine" and 'string_value: "engine"' in written.config
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    (dict(engine_dir="missing"), "is not a directory"),
    (dict(engine_dir="."), "is not an engine directory"),
    (dict(max_batch=0), "--max-batch must be an integer in 1"),
    (dict(max_batch=65), "--max-batch must be an integer in 1"),
    (dict(instances=0), "--instances must be an integer in 1"),
    (dict(kind="tpu"), "--kind must be one of cpu, gpu, auto"),
    (dict(name="a/b"), "is not a model name"),
    (dict(queue_timeout_s=0), "queue timeout > 0"),
])
def test_writer_refuses_with_one_line_and_leaves_nothing(exported, tmp_path, change, message):
    engine = exported("sd15", "fp32")
    options = dict(engine_dir=engine, repo=tmp_path / "out" / "repo", name=NAME)
    if "engine_dir" in change:
        change = dict(engine_dir=tmp_path / change["engine_dir"])
    with pytest.raises(UserError, match=message) as info:
        write_repo(RepoOptions(**{**options, **change}))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "repo").exists()
    assert not (tmp_path / "out").exists() or _leftovers(tmp_path / "out") == []


def test_cli_refuses_a_bad_kind_with_exit_2(exported, tmp_path):
    r = run_sdrt("triton-repo", str(exported("sd15", "fp32")), "-o", str(tmp_path / "repo"), "--kind", "tpu")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --kind must be one of cpu, gpu, auto (got 'tpu')"]


# ---- the model's input handling (plain functions of model.py; no Triton needed) ----------------------------------
def test_rows_of_reads_every_row_and_maps_names():
    rows = triton_model.rows_of({
        "prompt": np.array([[b"a cat"], ["a d\u00f6g".encode()]], dtype=object),
        "seed": np.array([[3], [-1]], dtype=np.int64),
        "guidance_scale": np.array([[1.5], [7.5]], dtype=np.float32),
        "sampler": np.array([[b""], [b"Euler a"]], dtype=object),
    })
    assert rows == [dict(prompt="a cat", seed=3, guidance=1.5),
                    dict(prompt="a d\u00f6g", seed=-1, guidance=7.5, sampler="Euler a")]
    assert all(type(r["seed"]) is int for r in rows)
    assert triton_model.rows_of({"prompt": np.array([b"x"], dtype=object)}) == [dict(prompt="x")]


@pytest.mark.parametrize("inputs, message", [
    ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, "prompt: is not UTF-8 text"),
    ({"steps": np.array([[2]], dtype=np.int32)}, "prompt: is required"),
    ({"prompt": np.array([[b"a"], [b"b"]], dtype=object), "steps": np.array([[2]], dtype=np.int32)},
     "steps: has 1 rows, prompt has 2"),
    ({"prompt": np.array([[[b"a"]]], dtype=object)}, "prompt: must hold one value per row"),
])
def test_rows_of_refuses_bad_inputs(inputs, message):
    with pytest.raises(triton_model.RowError, match=message):
        triton_model.rows_of(inputs)


def test_error_text_names_this_models_inputs():
    from sdrt.runtime.fields import InvalidRequest

    assert triton_model.error_text(InvalidRequest("guidance", "must be at most 100"), None) == \
        "guidance_scale: must be at most 100"
    assert triton_model.error_text(InvalidRequest("width", "must be a multiple of 2"), 1) == \
        "row 1: width: must be a multiple of 2"
    assert triton_model.error_text(RuntimeError("boom"), None) == "internal error (RuntimeError): boom"


# ---- a real tritonserver ------------------------------------------------------------------------------------------
# The stub's Python finds its environment from the first `python` on PATH: a venv holding numpy 1.26 that also
# reads this venv's site-packages (see Makefile's triton-server).
STUB_VENV = Path(sys.prefix) / "pytriton" / "stub-venv"


def _server_tree() -> tuple[Path, Path] | str:
    """(tritonserver folder of the pytriton wheel, its bundled libraries) or why it cannot run here."""
    unpacked = Path(sys.prefix) / "pytriton" / "pytriton"  # `make` unpacks the wheel there (see Makefile)
    if (unpacked / "tritonserver").is_dir():
        root = unpacked / "tritonserver"
    else:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            return ("no tritonserver: `make triton-server` unpacks PyPI's nvidia-pytriton wheel into the venv "
                    "(or pip install nvidia-pytriton)")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "bin" / "tritonserver").is_file():
        return f"{root / 'bin' / 'tritonserver'} is missing"
    if not (stub / "triton_python_backend_stub").is_file():
        return f"the pytriton wheel has no Python backend stub for Python {stub.name}"
    if sys.platform != "linux":
        return "the pytriton wheel's tritonserver is a Linux binary"
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2 and not (STUB_VENV / "bin" / "python").exists():
        # The wheel's Python-backend stub is built against numpy 1: under numpy 2 it hands the model BYTES inputs
        # as arrays filled with one byte value (seen here: "a cat 0" arrived as [9, 9, 9, …]). `make triton-server`
        # makes a venv for the stub's process with numpy 1.26 ahead of this venv's packages.
        return (f"the nvidia-pytriton 0.7.0 Python backend stub needs numpy < 2 and {STUB_VENV} is missing "
                "(`make triton-server` makes it)")
    return root, libs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except OSError as e:
        return getattr(e, "code", 0) or 0, ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class Server:
    def __init__(self, http: int, metrics: int, log: Path, engine: Path):
        self.url = f"127.0.0.1:{http}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.log = log
        self.engine = engine

    def counters(self) -> dict[str, float]:
        status, text = _get(self.metrics_url)
        assert status == 200
        out = {}
        for line in text.splitlines():
            for name in ("nv_inference_exec_count", "nv_inference_request_success", "nv_inference_count"):
                if line.startswith(name + "{") and f'model="{NAME}"' in line:
                    out[name] = float(line.rsplit(" ", 1)[1])
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def _tritonserver(engine: Path, work: Path, name: str = NAME):
    """A real tritonserver on loopback ports serving `engine` as model `name`; stopped whatever happens."""
    tree = _server_tree()
    if isinstance(tree, str):
        pytest.skip(tree)
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    root, libs = tree
    env = {**os.environ, "PATH": f"{STUB_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH")) if p)}
    binary = root / "bin" / "tritonserver"
    probe = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env, timeout=30)
    if "--model-repository" not in probe.stdout + probe.stderr:
        pytest.skip(f"the pytriton wheel's tritonserver does not run here: {(probe.stderr or probe.stdout)[-300:]}")

    backends = work / "backends" / "python"  # our own backend folder: the wheel's Python backend + this stub
    backends.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, backends / f.name)
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(stub / "triton_python_backend_stub", backends / "triton_python_backend_stub")

    r = run_sdrt("triton-repo", str(engine), "-o", str(work / "repo"), "--name", name, "--kind", "cpu",
                 "--max-batch", "8", "--queue-delay-ms", "300", "--copy-engine")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(work / "repo" / name)

    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    log = work / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), "--model-repository", str(work / "repo"), "--backend-directory", str(work / "backends"),
             "--http-address", "127.0.0.1", "--http-port", str(http),
             "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
             "--allow-gpu-metrics", "false", "--exit-timeout-secs", "10"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    srv = Server(http, metrics, log, engine)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode} while loading:\n{srv.log_tail()}")
            if _get(f"http://{srv.url}/v2/models/{name}/ready", timeout=1)[0] == 200:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"tritonserver did not get {name} ready in 90 s:\n{srv.log_tail()}")
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    with _tritonserver(exported("sd15", "fp32"), tmp_path_factory.mktemp("triton")) as srv:
        yield srv


def _infer(url: str, prompt, model: str = NAME, **values):
    """One KServe v2 request (its own client: tritonclient's clients are not shared between threads).
    Returns (images [rows, H, W, 3], seeds [rows]) or the InferenceServerException."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    types = {"prompt": ("BYTES", object), "negative_prompt": ("BYTES", object), "sampler": ("BYTES", object),
             "seed": ("INT64", np.int64), "steps": ("INT32", np.int32), "width": ("INT32", np.int32),
             "height": ("INT32", np.int32), "guidance_scale": ("FP32", np.float32)}
    prompts = prompt if isinstance(prompt, list) else [prompt]
    rows = len(prompts)
    inputs = []
    for name, value in {"prompt": prompts, **values}.items():
        datatype, dtype = types[name]
        column = value if isinstance(value, list) else [value] * rows
        column = [v.encode() if isinstance(v, str) else v for v in column]
        array = np.array(column, dtype=dtype).reshape(rows, 1)
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = httpclient.InferenceServerClient(url, network_timeout=120, connection_timeout=10)
    try:
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput("image"),
                                                     httpclient.InferRequestedOutput("seed")])
        return result.as_numpy("image"), result.as_numpy("seed").reshape(-1).tolist()
    except InferenceServerException as e:
        return e
    finally:
        client.close()


def _concurrently(calls: list) -> list:
    """Start every call at once (a barrier), each on its own thread; results in order."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def work(i, fn):
        barrier.wait(timeout=30)
        results[i] = fn()

    threads = [threading.Thread(target=work, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request did not come back within 120 s"
    return results


@pytest.fixture(scope="module")
def reference(server):
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    pipe = Pipeline.load(server.engine, backend="ort-cpu")
    return lambda **flat: np.asarray(pipe.generate(Request.of(**flat))[0].convert("RGB"))


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def test_server_is_ready_and_was_warmed_up_before(server):

    assert _get(f"http://{server.url}/v2/health/ready")[0] == 200
    status, text = _get(f"http://{server.url}/v2/models/{NAME}/config")
    assert status == 200 and '"max_batch_size":8' in text and '"KIND_CPU"' in text
    # initialize() ran the warm-up batches (one image, then max_batch_size) before Triton called the model ready
    assert "warm-up batches [1, 8]" in server.log_tail(100000)


def test_concurrent_requests_are_batched_and_equal_sdrt_run(server, reference):
    """6 concurrent requests, two sizes: Triton batches them (fewer executions than requests), the model regroups
    them by compatibility key, and each image equals the one `sdrt run` makes with the same seed."""
    cases = [dict(prompt=f"a cat {i}", seed=100 + i, **GOOD) for i in range(4)] + \
            [dict(prompt=f"a house {i}", seed=200 + i, **{**GOOD, "width": 40, "height": 24}) for i in range(2)]
    before = server.counters()
    results = _concurrently([lambda c=c: _infer(server.url, **c) for c in cases])
    after = server.counters()
    for case, result in zip(cases, results):
        assert not isinstance(result, Exception), f"{case}: {result}"
        images, seeds = result
        assert images.shape == (1, case["height"], case["width"], 3) and images.dtype == np.uint8
        assert seeds == [case["seed"]]
        assert _max_diff(images[0], reference(**case)) <= 1
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    successes = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    print(f"\n6 requests → {executions:g} model executions, {successes:g} successes")
    assert successes == len(cases)
    assert 1 <= executions < len(cases)


def test_a_request_with_several_rows_gets_one_image_per_row(server, reference):
    result = _infer(server.url, ["a red cube", "a blue cube"], seed=[7, 9], negative_prompt="blurry", **GOOD)
    assert not isinstance(result, Exception), result
    images, seeds = result
    assert images.shape == (2, 32, 32, 3) and seeds == [7, 9]
    assert _max_diff(images[1], reference(prompt="a blue cube", seed=9, negative_prompt="blurry", **GOOD)) <= 1


def test_bad_requests_fail_alone(server, reference):
    """Bad rows sent with good ones, at once: each bad request gets its own message, its neighbours their images,
    and the model stays up."""
    from tritonclient.utils import InferenceServerException

    good = [dict(prompt=f"a tree {i}", seed=300 + i, **GOOD) for i in range(3)]
    bad = [(dict(prompt="bad width", seed=1, **{**GOOD, "width": 31}),
            "width: must be a multiple of 2 for this model (got 31; 30 or 32 would do)"),
           (dict(prompt="no steps", seed=1, **{**GOOD, "steps": 0}), "steps: must be at least 1 (got 0)"),
           (dict(prompt=b"\xff\xfe not utf-8", seed=1, **GOOD), "prompt: is not UTF-8 text"),
           (dict(prompt="too much guidance", seed=1, guidance_scale=1000.0, **GOOD),
            "guidance_scale: must be at most 100"),
           (dict(prompt=["two rows", "second is bad"], seed=[1, 2], **{**GOOD, "width": [32, 33]}),
            "row 1: width: must be a multiple of 2")]
    cases = good + [b for b, _ in bad]
    before = server.counters()
    results = _concurrently([lambda c=c: _infer(server.url, **c) for c in cases])
    executions = server.counters()["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    print(f"\n{len(good)} good and {len(bad)} bad requests → {executions:g} model executions")
    for case, result in zip(good, results):
        assert not isinstance(result, Exception), f"{case}: {result}"
        assert _max_diff(result[0][0], reference(**case)) <= 1
    for (case, message), result in zip(bad, results[len(good):]):
        assert isinstance(result, InferenceServerException), f"{case} should have failed"
        assert message in result.message(), result.message()
        assert result.status() == "400", (case, result.status())  # INVALID_ARG: clients do not retry it
    assert _get(f"http://{server.url}/v2/models/{NAME}/ready")[0] == 200
    images, seeds = _infer(server.url, "after the errors", seed=5, **GOOD)
    assert seeds == [5] and images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_flux_behind_triton_equals_sdrt(tmp_path):
    """FLUX.1 (a tiny schnell export) as a Triton model: rows batched as the service batches them, each image the
    Python API's for the same seed (no negative prompt, guidance ignored by schnell)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_flux
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    folder = write_tiny_flux(tmp_path / "flux", "schnell")
    engine = tmp_path / "engine"
    export(ExportConfig(model=str(folder), output=engine, precision="fp32",
                        components=("text_encoder", "text_encoder_2", "transformer", "vae_decoder")))
    settings = dict(steps=4, width=32, height=48)
    pipe = Pipeline.load(engine, backend="ort-cpu")
    with _tritonserver(engine, tmp_path / "triton", "flux") as srv:
        result = _infer(srv.url, ["a red fox", "a blue car"], model="flux", seed=[3, 4], **settings)
        assert not isinstance(result, Exception), result
        images, seeds = result
        assert images.shape == (2, 48, 32, 3) and seeds == [3, 4]
        for i, (prompt, seed) in enumerate((("a red fox", 3), ("a blue car", 4))):
            ours = np.asarray(pipe.generate(Request.of(prompt=prompt, seed=seed, **settings))[0].convert("RGB"))
            assert _max_diff(images[i], ours) == 0
        refused = _infer(srv.url, "a cat", model="flux", seed=1, negative_prompt="blurry", **settings)
        assert "negative_prompt" in refused.message() and refused.status() == "400"
