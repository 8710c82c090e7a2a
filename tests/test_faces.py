"""Faces from photos (runtime/conditioning/faces.py) through insightface 2.1's own FaceAnalysis, on small random-weight
ONNX stand-ins with the I/O signatures its model router recognises (reference/identity.md §1): an SCRFD-like detector
(9 outputs: score, bbox and keypoint distances at strides 8, 16, 32, two anchors; a bias on the score makes textured
patches "faces" deterministically and flat ones none) and an ArcFace-like recogniser (112² input → 512 numbers).
The reference is insightface's own output for the face each method's code picks (InstantID and PuLID: the largest
bbox after their resizes; PhotoMaker v2: faces[0], detection retried at 640, 576, …, 256)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.conditioning import faces, instantid, photomaker, pulid
from sdrt.runtime.conditioning.kinds import Context
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.request import Request

insightface_app = pytest.importorskip("insightface.app")
onnx = pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

STRIDES = (8, 16, 32)
TEMPLATE = np.array([[-0.7, -0.6], [0.7, -0.6], [0.0, 0.1], [-0.6, 0.8], [0.6, 0.8]])  # keypoints, in strides


def _tensor(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def write_detector(path, score_bias: float, seed: int = 0):
    """SCRFD's layout as insightface reads it: outputs score_8/16/32 [N, 1], bbox_* [N, 4], kps_* [N, 10] (N = cells
    × 2 anchors; rank 2: not batched), each a stride-s convolution of the (x − 127.5)/128 image. Zero-mean kernels:
    a flat patch scores sigmoid(score_bias) exactly."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        for kind, channels in (("score", 2), ("bbox", 8), ("kps", 20)):
            w = rng.standard_normal((channels, 3, s, s))
            w = (w - w.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(3 * s * s)
            w, b = {"score": (w * 4, np.full(channels, score_bias)), "bbox": (w * 0.5, np.zeros(channels)),
                    "kps": (w * 0.05, np.tile(TEMPLATE.reshape(-1), 2))}[kind]
            p = f"{kind}_{s}"
            inits += [_tensor(p + ".w", w), _tensor(p + ".b", b),
                      onnx.numpy_helper.from_array(np.array([-1, channels // 2], np.int64), p + ".shape")]
            nodes.append(helper.make_node("Conv", ["input.1", p + ".w", p + ".b"], [p + ".conv"], kernel_shape=[s, s],
                                          strides=[s, s]))
            last = p + ".conv"
            if kind != "kps":
                nodes.append(helper.make_node("Sigmoid", [last], [p + ".sig"]))
                last = p + ".sig"
            if kind == "bbox":  # distances of 0.75 … 2.75 strides
                inits += [_tensor(p + ".k", 2.0), _tensor(p + ".o", 0.75)]
                nodes += [helper.make_node("Mul", [last, p + ".k"], [p + ".mul"]),
                          helper.make_node("Add", [p + ".mul", p + ".o"], [p + ".add"])]
                last = p + ".add"
            nodes += [helper.make_node("Transpose", [last], [p + ".t"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [p + ".t", p + ".shape"], [p])]
            outputs[kind].append(helper.make_tensor_value_info(p, TensorProto.FLOAT, [p + ".n", channels // 2]))
    graph = helper.make_graph(nodes, "scrfd_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              outputs["score"] + outputs["bbox"] + outputs["kps"], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


def write_recogniser(path, width: int = 512, seed: int = 1):
    """ArcFace's layout: [n, 3, 112, 112] → [n, width] (an 8² average pool and a dense layer)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    features = 3 * 14 * 14
    nodes = [helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc1"])]
    inits = [_tensor("fc.w", rng.standard_normal((features, width)) * 3 / np.sqrt(features)),
             _tensor("fc.b", rng.standard_normal(width))]
    graph = helper.make_graph(nodes, "arcface_standin",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["n", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["n", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """{"many": a pack finding several faces in noise at 640, "few": one finding faces only at smaller sizes}."""
    root = tmp_path_factory.mktemp("face_models")
    out = {}
    for name, bias in (("many", -5.0), ("few", -7.0)):
        folder = root / name
        folder.mkdir()
        write_detector(str(folder / "det_standin.onnx"), bias)
        write_recogniser(str(folder / "rec_standin.onnx"))
        out[name] = folder
    return out


def _noise(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


_APPS = {}


def _analysis(folder, det_size):
    """insightface's FaceAnalysis prepared at det_size as the references prepare it (one per folder: ctx_id 0 on
    the CPU provider changes the detection size only)."""
    if folder not in _APPS:
        _APPS[folder] = insightface_app.FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"])
    _APPS[folder].prepare(ctx_id=0, det_size=(det_size, det_size))
    return _APPS[folder]


def _bgr(photo: Image.Image) -> np.ndarray:
    return cv2.cvtColor(np.array(photo.convert("RGB")), cv2.COLOR_RGB2BGR)


def _largest(found):
    return sorted(found, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]


def _resize_img(photo):  # InstantID's resize_img, defaults (infer.py)
    w, h = photo.size
    ratio = 1024 / min(h, w)
    w, h = round(ratio * w), round(ratio * h)
    ratio = 1280 / max(h, w)
    photo = photo.resize([round(ratio * w), round(ratio * h)], Image.BILINEAR)
    return photo.resize([(round(ratio * w) // 64) * 64, (round(ratio * h) // 64) * 64], Image.BILINEAR)


def _stub_dir(kind: str, record: dict):
    return SimpleNamespace(manifest={kind: record}, has=lambda component: True, path=None)


IID_RECORD = {"embed_dim": 512, "controlnet": "instantid/identitynet", "projection": "instantid/proj"}


def test_instantid_photo_gives_insightfaces_largest_face_and_its_keypoints(packs):
    photo = _noise(0, 160)
    resized = _resize_img(photo)
    found = _analysis(packs["many"], 640).get(_bgr(resized))
    ref = _largest(found)
    assert len(found) > 1 and ref is not found[0]  # the rule matters on this photo
    request = Request.of(prompt="a person", instantid_face=photo, face_models=str(packs["many"]))
    request = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))  # JSON: a base64 photo
    use = instantid.validate(request, _stub_dir("instantid", IID_RECORD), Context(64, 64))
    assert np.array_equal(use.face, ref.embedding) and use.face.dtype == np.float32
    drawn = instantid.draw_kps(ref.kps.astype(np.float64), *resized.size)
    assert use.kps_image.size == resized.size and np.array_equal(np.asarray(use.kps_image), np.asarray(drawn))
    given = [[5.0, 5.0], [20.0, 5.0], [12.0, 12.0], [6.0, 20.0], [18.0, 20.0]]  # keypoints given: they win
    request = Request.of(prompt="a person", instantid_face=photo, instantid_kps=given, face_models=str(packs["many"]))
    use = instantid.validate(request, _stub_dir("instantid", IID_RECORD), Context(32, 24))
    assert use.kps_image.size == (32, 24) and np.array_equal(use.face, ref.embedding)


def test_photomaker_v2_takes_the_first_face_retrying_smaller_detection_sizes(packs):
    record = {"version": "v2", "face_width": 512}
    first, retried = _noise(0, 160), _noise(1, 256)
    expected = []
    for photo, folder in ((first, packs["many"]), (retried, packs["few"])):
        for size in faces.RETRY_SIZES:  # PhotoMaker's analyze_faces: 640, 576, …, 256 until a face appears
            found = _analysis(folder, size).get(_bgr(photo))
            if found:
                break
        expected.append((size, found))
    (size, found), (smaller, retried_found) = expected
    assert size == 640 and _largest(found) is not found[0] and smaller < 640
    got = photomaker._faces(None, record, (first,), str(packs["many"]))
    assert np.array_equal(got, found[0].embedding[None])
    got = photomaker._faces(None, record, (retried,), str(packs["few"]))
    assert np.array_equal(got, retried_found[0].embedding[None])
    assert faces.read(packs["few"], retried, faces.PHOTOMAKER, "x").det_size == smaller


def test_pulid_photo_gives_the_arcface_part_of_the_inputs(packs):
    record = {"face_dim": 512, "eva_dim": 8, "eva_layers": 2, "eva_width": 4}
    photo = _noise(0, 160).resize((1120, 1120), Image.NEAREST)  # long side > 1024: PuLID's Lanczos resize
    rgb = np.array(photo)
    small = cv2.resize(rgb, (1024, 1024), interpolation=cv2.INTER_LANCZOS4)  # resize_numpy_image_long(…, 1024)
    ref = _largest(_analysis(packs["many"], 640).get(cv2.cvtColor(small, cv2.COLOR_RGB2BGR)))
    eva = np.arange(1, 9, dtype=np.float32)
    request = Request.of(prompt="a person", pulid_id={"embedding": photo, "eva_embedding": eva,
                                                      "eva_hidden": np.ones((2, 3, 4))})
    given = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True)))).pulid.pulid_id
    assert isinstance(given["embedding"], Image.Image)  # JSON: the photo as base64 in the inputs' mapping
    id_cond, _ = pulid._inputs(given, record, str(packs["many"]))
    assert np.array_equal(id_cond[:512], ref.embedding)
    assert np.allclose(id_cond[512:], eva / np.linalg.norm(eva))


def test_no_face_and_no_models_are_clear_errors(packs, tmp_path):
    stub = _stub_dir("instantid", IID_RECORD)
    gray = Image.new("RGB", (96, 96), (128, 128, 128))  # flat: every score is sigmoid(bias) < 0.5
    cases = [(dict(instantid_face=gray, face_models=str(packs["many"])), "instantid_face", "no face found"),
             (dict(instantid_face=gray), "face_models", "antelopev2"),
             (dict(instantid_face=gray, face_models=str(tmp_path / "none")), "face_models", "is not a folder")]
    only_detector = tmp_path / "det_only"
    only_detector.mkdir()
    write_detector(str(only_detector / "det.onnx"), -5.0)
    cases += [(dict(instantid_face=gray, face_models=str(tmp_path)), "face_models", "no insightface detector"),
              (dict(instantid_face=gray, face_models=str(only_detector)), "face_models", "no insightface recogniser")]
    for extra, field, text in cases:
        with pytest.raises(InvalidRequest, match=text) as e:
            instantid.validate(Request.of(prompt="a person", **extra), stub, Context(64, 64))
        assert e.value.field == field and "\n" not in str(e.value), extra
    with pytest.raises(InvalidRequest, match="non-commercial"):
        faces.read(None, gray, faces.PULID, "pulid_id.embedding")
    with pytest.raises(InvalidRequest, match=r"640, 576, .*256") as e:
        photomaker._faces(None, {"version": "v2", "face_width": 512}, (_noise(0, 64), gray), str(packs["many"]))
    assert e.value.field == "photomaker_images[1]"


@pytest.mark.slow
def test_cli_instantid_from_a_photo_equals_the_precomputed_path(exported, tiny_pipeline, tmp_path):
    """`sdrt run --instantid-face PHOTO --face-models DIR` makes the image that the face's insightface embedding and
    its keypoint image (drawn on InstantID's resized photo) make through the .npy path; a photo without a face: one
    line, exit 2."""
    import os
    import shutil

    from conftest import run_sdrt

    from sdrt.export.exporter import add_controlnets
    from sdrt.export.models.tiny import FACEID_WIDTH, write_tiny_instantid

    engine = tmp_path / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    add_controlnets(engine, (), instantid=str(write_tiny_instantid(tiny_pipeline("sdxl"), tmp_path / "iid", seed=6)))
    models = tmp_path / "models"
    models.mkdir()
    write_detector(str(models / "det.onnx"), -5.0)
    write_recogniser(str(models / "rec.onnx"), width=FACEID_WIDTH)
    photo = _noise(0, 160)
    photo.save(tmp_path / "photo.png")
    resized = _resize_img(photo)
    ref = _largest(_analysis(models, 640).get(_bgr(resized)))
    np.save(tmp_path / "face.npy", ref.embedding)
    instantid.draw_kps(ref.kps.astype(np.float64), *resized.size).save(tmp_path / "kps.png")
    common = ("run", str(engine), "a person", "--steps", "2", "--width", "48", "--height", "32", "--seed", "3")
    a = run_sdrt(*common, "--instantid-face", str(tmp_path / "photo.png"), "--face-models", str(models),
                 "-o", str(tmp_path / "a.png"))
    b = run_sdrt(*common, "--instantid-face", str(tmp_path / "face.npy"), "--instantid-kps", str(tmp_path / "kps.png"),
                 "-o", str(tmp_path / "b.png"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    Image.new("RGB", (96, 96), (128, 128, 128)).save(tmp_path / "gray.png")
    for extra, text in ((("--face-models", str(models)), "no face found"), ((), "antelopev2")):
        c = run_sdrt(*common, "--instantid-face", str(tmp_path / "gray.png"), *extra, "-o", str(tmp_path / "c.png"))
        lines = [line for line in c.stderr.splitlines() if line.strip()]
        assert c.returncode == 2 and len(lines) == 1 and text in lines[0], c.stderr
    assert not (tmp_path / "c.png").exists()


def test_cli_options_carry_photos_and_the_models_folder(tmp_path):
    from sdrt.cli.generate import RunOptions, build_request
    from sdrt.runtime.errors import UserError

    _noise(0, 32).save(tmp_path / "photo.png")
    np.savez(tmp_path / "eva.npz", eva_embedding=np.ones(8), eva_hidden=np.ones((2, 3, 4)))
    np.save(tmp_path / "tokens.npy", np.ones((4, 8)))
    base = dict(engine_dir=tmp_path, prompts=("a person",), face_models=tmp_path / "models")
    request = build_request(RunOptions(**base, instantid_face=tmp_path / "photo.png",
                                       pulid_id=tmp_path / "eva.npz", pulid_photo=tmp_path / "photo.png"))
    assert request.adapters.face_models == str(tmp_path / "models")
    assert isinstance(request.instantid.instantid_face, Image.Image) and request.instantid.instantid_kps is None
    assert isinstance(request.pulid.pulid_id["embedding"], Image.Image)
    assert set(request.pulid.pulid_id) == {"embedding", "eva_embedding", "eva_hidden"}
    alone = build_request(RunOptions(**base, pulid_photo=tmp_path / "photo.png"))  # the whole identity from the photo
    assert set(alone.pulid.pulid_id) == {"embedding"}  # (tests/test_pulid_eva.py)
    with pytest.raises(UserError, match="ID tokens"):
        build_request(RunOptions(**base, pulid_id=tmp_path / "tokens.npy", pulid_photo=tmp_path / "photo.png"))


def test_a_server_reads_faces_with_its_own_models_never_a_requests(exported, tmp_path):
    """Behind a service (sdrt serve, Triton, Ray) the insightface folder is the server's `--face-models`: a request
    naming a path is refused (it would let a client load any ONNX file on the server), requests without one get it."""
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.service import Service

    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu", face_models=tmp_path)
    assert pipe.with_face_models(Request.of(prompt="a cat")).adapters.face_models == str(tmp_path)
    given = Request.of(prompt="a cat", face_models="/elsewhere")
    assert pipe.with_face_models(given).adapters.face_models == "/elsewhere"  # the Python API / CLI may name one
    with Service(pipe, max_batch=1) as service:
        with pytest.raises(InvalidRequest, match="the server's setting") as e:
            service.validate(given)
        assert e.value.field == "face_models"
        assert service.validate(Request.of(prompt="a cat", steps=2, width=32, height=32)).steps == 2
