"""PuLID's ID encoder inputs from one photo (reference/identity.md §3, PuLID's pipeline.py get_id_embedding), for
pulid.py when a request gives the photo alone (`pulid_id: {"embedding": PHOTO}`, `sdrt run --pulid-photo` without
--pulid-id). Graphs: `pulid/parsing` and `pulid/eva` (export/extras/pulid_eva.py).

At validation (faces.py's insightface models, no graph):
1. the photo's long side to at most 1024 (Lanczos) and its largest face, as faces.PULID reads it: the raw ArcFace
   `embedding` [512] and the face's 5 keypoints;
2. the face aligned as facexlib's FaceRestoreHelper(face_size=512) does: cv2.estimateAffinePartial2D(keypoints, the
   FFHQ-512 template, LMEDS) and a 512² warpAffine (bilinear, constant border (135, 133, 132) in facexlib's BGR order,
   i.e. (132, 133, 135) on sdrt's RGB pixels). Deviation: PuLID takes the keypoints from facexlib's RetinaFace-R50
   (the face nearest the photo's centre, threshold 0.97); sdrt takes insightface's SCRFD keypoints of the largest face
   (the face PuLID's ArcFace part uses), so no second detector has to be exported. Both place the same five points
   (eyes, nose tip, mouth corners); on a one-face photo the crops differ by the two detectors' keypoint error only.
   PuLID's fallbacks (ArcFace on the crop when insightface finds no face; facexlib's failure) become "no face found".
At attach (the graphs, once per identity: pulid.py caches the ID tokens):
3. RGB/255, ImageNet mean/std → `pulid/parsing` (BiSeNet) → argmax; the classes background, ears, earring, neck,
   necklace, cloth, hat → white 1.0, every other pixel → gray 0.299 R + 0.587 G + 0.114 B on all three channels;
4. 512² → 336² bicubic without antialiasing (torch's interpolate, align_corners False: torchvision 0.15's tensor
   resize, the version PuLID pins; torchvision ≥ 0.17 antialiases by default), CLIP's mean/std → `pulid/eva` →
   eva_embedding [768] (L2-normalised), eva_hidden [5, 577, 1024].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.conditioning import faces
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.fields import InvalidRequest

FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)  # facexlib, face_size 512
CROP = 512
BORDER_RGB = (132, 133, 135)  # facexlib's borderValue (135, 133, 132), given in its BGR order
PARSE_MEAN, PARSE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # get_id_embedding's normalize for BiSeNet
KEPT_AS_WHITE = (0, 7, 8, 9, 14, 15, 16, 18)  # its bg_label: background, ears, earring, neck, necklace, cloth, hat
GRAY = (0.299, 0.587, 0.114)  # its to_gray
EXPORT_FLAGS = "--pulid-eva EVA02_CLIP_L_336_psz14_s6B.pt --pulid-parsing parsing_bisenet.pth"


@dataclass(frozen=True, eq=False)
class PhotoFace:
    embedding: np.ndarray  # [512] raw ArcFace
    crop: np.ndarray  # [512, 512, 3] uint8 RGB, aligned onto FFHQ-512
    digest: str  # the face and crop bytes with the two graphs' hashes


def photo_only(given) -> bool:
    """A PuLID identity given as one photo: {"embedding": PIL image} without EVA's inputs."""
    return set(given) == {"embedding"} and isinstance(given["embedding"], Image.Image)


def align(rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """facexlib's align_warp_face on `rgb` (uint8 RGB) for the face with keypoints `kps` [5, 2] → [512, 512, 3]."""
    import cv2

    matrix = cv2.estimateAffinePartial2D(np.asarray(kps, dtype=np.float64), FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    if matrix is None:
        raise ValueError("no similarity transform for these keypoints")
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (CROP, CROP), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_RGB)


def read(photo: Image.Image, record: dict, model_dir, face_models) -> PhotoFace:
    """Step 1–2 for the validated request: the face's embedding and aligned crop; InvalidRequest("pulid_id") when the
    directory lacks the photo path's graphs or the photo has no face."""
    photo_record = record.get("photo")
    graphs = (photo_record["eva"]["graph"], photo_record["parsing"]["graph"]) if photo_record else ()
    if not photo_record or not all(model_dir.has(g) for g in graphs):
        raise InvalidRequest("pulid_id", "a photo alone needs PuLID's photo path (pulid/eva, pulid/parsing), which "
                                         f"this engine directory lacks: add it with `sdrt export DIR {EXPORT_FLAGS}`, "
                                         "or give eva_embedding and eva_hidden with the photo")
    photo = fields.image("pulid_id.embedding", photo, "RGB")
    face = faces.read(face_models, photo, faces.PULID, "pulid_id.embedding")
    crop = align(faces.pixels_for(photo, faces.PULID.resize), face.kps)  # the pixels faces.read found the face on
    components = (model_dir.manifest or {}).get("components", {})
    graph_hashes = "".join(str(components.get(g, {}).get("sha256")) for g in graphs)
    digest = hashlib.sha256(face.embedding.tobytes() + crop.tobytes() + graph_hashes.encode()).hexdigest()
    return PhotoFace(face.embedding, crop, digest)


def features(crop: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Step 3's image: [3, 512, 512] float32, white where the parse says not-face, gray elsewhere."""
    rgb = crop.astype(np.float32).transpose(2, 0, 1) / 255.0
    keep = np.isin(logits.argmax(axis=0), KEPT_AS_WHITE)
    gray = GRAY[0] * rgb[0] + GRAY[1] * rgb[1] + GRAY[2] * rgb[2]
    return np.where(keep, np.float32(1.0), gray)[None].repeat(3, axis=0).astype(np.float32)


def eva_pixels(image: np.ndarray, record: dict) -> torch.Tensor:
    """Step 4's resize and normalisation: [3, 512, 512] → [1, 3, S, S]."""
    size = record["image_size"]
    x = F.interpolate(torch.from_numpy(image)[None], size=(size, size), mode="bicubic", align_corners=False,
                      antialias=False)
    mean, std = torch.tensor(record["mean"]).view(1, 3, 1, 1), torch.tensor(record["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def parse_pixels(crop: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(crop.astype(np.float32).transpose(2, 0, 1) / 255.0)[None]
    return (x - torch.tensor(PARSE_MEAN).view(1, 3, 1, 1)) / torch.tensor(PARSE_STD).view(1, 3, 1, 1)


def encoder_inputs(parts, record: dict, face: PhotoFace) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3–4 through the two graphs → the ID encoder's (id_cond [1280], hidden [5, T, W])."""
    photo = record["photo"]
    parsing = parts.component(photo["parsing"]["graph"])
    logits = feed_mod.run(parsing, pixel_values=parse_pixels(face.crop))["logits"][0].numpy()
    eva = parts.component(photo["eva"]["graph"])
    out = feed_mod.run(eva, pixel_values=eva_pixels(features(face.crop, logits), photo["eva"]))
    embedding = out["eva_embedding"][0].numpy()
    id_cond = np.concatenate([face.embedding, embedding / np.linalg.norm(embedding)]).astype(np.float32)
    return id_cond, np.ascontiguousarray(out["eva_hidden"][0].numpy(), dtype=np.float32)
