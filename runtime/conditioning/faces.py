"""One face read from a photo through insightface's own FaceAnalysis (reference/identity.md §1), for the face-ID kinds
(instantid.py, photomaker.py v2, pulid.py) when a request gives a photo instead of a precomputed embedding.

`face_models` is a folder of insightface ONNX files (antelopev2 or buffalo_l, unzipped); insightface 2.1 routes each
file by its inputs and outputs (≥ 5 outputs: the SCRFD detector; a square input ≥ 112 divisible by 16: ArcFace). Only
detection and recognition are loaded (PhotoMaker v2's `allowed_modules`; the other packs' modules change neither the
boxes, the keypoints nor the embedding). What each method's own code does with the photo, re-stated:
- InstantID (infer.py, gradio_demo/app.py): the photo through `resize_img` (short side → 1024, long side → 1280,
  both floored to multiples of 64, bilinear), detection at 640×640, the face of the largest bbox
  (`sorted(faces, key=area)[-1]`);
- PuLID (app.py, pipeline.py get_id_embedding): the photo's long side to at most 1024 (`resize_numpy_image_long`,
  OpenCV Lanczos), detection at 640×640, the largest bbox as above;
- PhotoMaker v2 (insightface_package.py analyze_faces): the photo as given, detection at 640, 576, …, 320, 256 until
  a face appears, the first face of that list (`faces[0]`, the detector's score order).
Each gives the raw `embedding` (not `normed_embedding`) and the 5 keypoints (photo pixels, after the method's resize).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime.conditioning.cache import LruCache
from sdrt.runtime.fields import InvalidRequest

DET_SIZE = 640  # every reference prepares (640, 640); insightface ≥ 1.0's default is "auto" (128 and 640)
RETRY_SIZES = (640, 576, 512, 448, 384, 320, 256)  # PhotoMaker v2's analyze_faces
CACHE_SIZE = 64  # photos whose face stays cached
DOWNLOAD = ("a folder of insightface's ONNX models: antelopev2 (InstantID, PuLID; scrfd_10g_bnkps.onnx + "
            "glintr100.onnx, from its Hugging Face mirrors) or buffalo_l (PhotoMaker v2; det_10g.onnx + "
            "w600k_r50.onnx, insightface's model-zoo release), unzipped; insightface's models are for non-commercial "
            "research only")


@dataclass(frozen=True)
class Rule:
    """How a method's own code picks one face from a photo."""
    name: str
    resize: str  # "instantid" | "pulid" | "none"
    sizes: tuple[int, ...]  # detection sizes tried in turn until a face appears
    largest: bool  # the largest bbox (else the first face)


INSTANTID = Rule("InstantID", "instantid", (DET_SIZE,), True)
PULID = Rule("PuLID", "pulid", (DET_SIZE,), True)
PHOTOMAKER = Rule("PhotoMaker v2", "none", RETRY_SIZES, False)


@dataclass(frozen=True, eq=False)
class Face:
    embedding: np.ndarray  # [512] float32, insightface's raw `embedding`
    kps: np.ndarray  # [5, 2] float32: eyes, nose, mouth corners, in pixels of `size`
    bbox: np.ndarray  # [4] x1, y1, x2, y2
    size: tuple[int, int]  # (width, height) of the photo the face was read on (after the method's resize)
    det_size: int


def resize_instantid(photo: Image.Image) -> Image.Image:
    """InstantID's resize_img with its defaults (max_side 1280, min_side 1024, bilinear, multiples of 64)."""
    w, h = photo.size
    ratio = 1024 / min(h, w)
    w, h = round(ratio * w), round(ratio * h)
    ratio = 1280 / max(h, w)
    photo = photo.resize([round(ratio * w), round(ratio * h)], Image.BILINEAR)
    return photo.resize([round(ratio * w) // 64 * 64, round(ratio * h) // 64 * 64], Image.BILINEAR)


def pixels_for(photo: Image.Image, resize: str) -> np.ndarray:
    """The photo as a method reads it (its Rule.resize), uint8 RGB: the pixels its face is found on."""
    if resize == "instantid":
        photo = resize_instantid(photo)
    rgb = np.asarray(photo.convert("RGB"))
    if resize == "pulid" and max(rgb.shape[:2]) > 1024:  # PuLID's resize_numpy_image_long(image, 1024)
        import cv2

        h, w = rgb.shape[:2]
        k = 1024 / max(h, w)
        rgb = cv2.resize(rgb, (int(w * k), int(h * k)), interpolation=cv2.INTER_LANCZOS4)
    return rgb


class Analysers:
    """insightface FaceAnalysis objects, one per model folder, each used under its own lock (detection sizes are
    its state)."""

    def __init__(self):
        self.entries, self.lock = {}, threading.Lock()

    def get(self, folder) -> tuple:
        if folder is None:
            raise InvalidRequest("face_models", f"reading a face from a photo needs {DOWNLOAD}; give its path "
                                                "(--face-models DIR), or give the face's embedding as numbers")
        path = Path(str(folder)).expanduser()
        if not path.is_dir():
            raise InvalidRequest("face_models", f"{folder} is not a folder; give {DOWNLOAD}")
        key = str(path.resolve())
        with self.lock:
            if key in self.entries:
                return self.entries[key]
            try:
                from insightface.app import FaceAnalysis
            except ImportError:
                raise InvalidRequest("face_models", "reading faces from photos needs the insightface package "
                                                    "(pip install insightface==2.1; it ships no models)") from None
            try:
                app = FaceAnalysis(name=key, providers=["CPUExecutionProvider"],
                                   allowed_modules=["detection", "recognition"])
            except AssertionError:  # insightface asserts a detector was found
                app = None
            if app is None or "recognition" not in app.models:
                raise InvalidRequest("face_models", f"{folder} holds no insightface "
                                                    f"{'detector' if app is None else 'recogniser'}; give {DOWNLOAD}")
            app.prepare(ctx_id=-1, det_size=(DET_SIZE, DET_SIZE))
            self.entries[key] = app, threading.Lock()
            return self.entries[key]


ANALYSERS = Analysers()


def find(app, app_lock, photo: Image.Image, rule: Rule, field: str) -> Face:
    """The face `rule` picks in `photo` through the FaceAnalysis `app`; InvalidRequest(field) when there is none."""
    rgb = pixels_for(photo, rule.resize)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    faces, used = [], rule.sizes[0]
    with app_lock:
        try:
            for used in rule.sizes:
                app.det_model.prepare(0, input_size=(used, used))  # ctx_id ≥ 0: sizes only, providers kept
                faces = app.get(bgr)
                if faces:
                    break
        finally:
            app.det_model.prepare(0, input_size=(DET_SIZE, DET_SIZE))
    if not faces:
        sizes = f"{rule.sizes[0]}×{rule.sizes[0]}" if len(rule.sizes) == 1 else \
            f"{', '.join(map(str, rule.sizes))} pixels"
        raise InvalidRequest(field, f"no face found in the photo (insightface's detector at {sizes}, as "
                                    f"{rule.name} does); give a photo with one clear face")
    if rule.largest:
        face = sorted(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]
    else:
        face = faces[0]
    return Face(np.asarray(face.embedding, dtype=np.float32).reshape(-1), np.asarray(face.kps, dtype=np.float32),
                np.asarray(face.bbox, dtype=np.float32), (rgb.shape[1], rgb.shape[0]), used)


CACHE = LruCache(CACHE_SIZE)  # faces per (model folder, rule, the photo's pixels)


def read(folder, photo: Image.Image, rule: Rule, field: str) -> Face:
    """The face `rule` picks in `photo`, read with the models in `folder` (cached per photo)."""
    app, app_lock = ANALYSERS.get(folder)
    digest = hashlib.sha256(f"{photo.mode}{photo.size}".encode() + photo.tobytes()).hexdigest()
    key = (str(Path(str(folder)).expanduser().resolve()), rule.name, digest)
    return CACHE.get(key, lambda: find(app, app_lock, photo, rule, field))
