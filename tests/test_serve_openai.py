"""The official `openai` SDK, unchanged, against `sdrt serve`'s /v1 routes on loopback: OpenAI's error object and
status codes (BadRequestError naming the param, AuthenticationError, NotFoundError), every spec field of
images.generate honoured, accepted without effect or refused, images.edit (img2img, and inpainting with OpenAI's
alpha mask) giving the runtime's own pixels for the same request, variations refused on a plain model and made on an
unCLIP one, and the streamed events as the SDK parses them."""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LoopbackServer
from sdrt.runtime.request import Request

openai = pytest.importorskip("openai", reason="the openai SDK is a test extra")

SIZE, STEPS = 32, 3
SD = {"steps": STEPS, "seed": 7, "guidance_scale": 5.0, "sampler": "euler_a"}  # sdrt's fields, via extra_body
RUNTIME = dict(steps=STEPS, seed=7, guidance=5.0, sampler="euler_a", width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def engine(exported, tiny_pipeline, tmp_path_factory):
    """The session's sd15 export with the tiny VAE added (streamed partial images are decoded by it)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.extras.tiny_vae import write_tiny_vae

    root = tmp_path_factory.mktemp("openai")
    taesd = write_tiny_vae(root / "taesd", scale_factor=2)
    out = root / "sd15-tiny"
    shutil.copytree(exported("sd15", "fp32"), out)
    export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32", tiny_vae=str(taesd)))
    return out


@pytest.fixture(scope="module")
def pipe(engine):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(engine, backend="ort-cpu")


@pytest.fixture(scope="module")
def server(engine, pipe):
    s = LoopbackServer(engine, pipe, api_key="k3y", model_name="tiny-sd15")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0, timeout=120)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)


def _png(image: Image.Image) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ("in.png", buffer.getvalue(), "image/png")


def _photo(seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _tokens(pipe, text: str) -> int:
    """The prompt's CLIP tokens as the served model's tokenizer splits them (`usage` counts these)."""
    return len(next(iter(pipe.tokenizers.values())).tokens(text))


def _openai_mask() -> tuple[Image.Image, Image.Image]:
    """OpenAI's mask (transparent = edit: the left half) and the same as sdrt's (white = repaint)."""
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[:, : SIZE // 2] = 0
    rgba = np.dstack([np.full((SIZE, SIZE, 3), 40, dtype=np.uint8), alpha])
    return Image.fromarray(rgba, "RGBA"), Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


# ---- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,param", [
    ({"background": "transparent"}, "background"),
    ({"quality": "ultra"}, "quality"),
    ({"output_format": "gif"}, "output_format"),
    ({"response_format": "url"}, "response_format"),
    ({"moderation": "none"}, "moderation"),
    ({"output_compression": 50}, "output_compression"),  # PNG is lossless
    ({"model": "dall-e-3"}, "model"),
    ({"size": "33x32"}, "size"),  # refused by the runtime's validation, named as this route names it
    ({"frame_count": 4}, "frame_count"),
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"extra_body": {"guidance": 3}}, "guidance"),  # an unknown field (sdrt's is guidance_scale)
])
def test_bad_values_raise_bad_request_naming_the_param(sdk, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.generate(prompt="x", **{"size": f"{SIZE}x{SIZE}", "extra_body": {"steps": STEPS}, **kwargs})
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert e.value.type == "invalid_request_error" and e.value.code and e.value.body["message"]


def test_401_404_and_the_error_object_elsewhere(server, sdk):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="x")
    assert e.value.code == "invalid_api_key" and e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("dall-e-3")
    assert e.value.param == "model"
    missing = httpx.post(server.url + "/v1/images/nothing", headers={"Authorization": "Bearer k3y"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    a1111 = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0},
                       headers={"Authorization": "Bearer k3y"})  # AUTOMATIC1111's routes keep sdrt's shape
    assert a1111.status_code == 422 and a1111.json()["error"]["field"] == "steps"


# ---- generations -------------------------------------------------------------------------------------------------

def test_fields_without_effect_change_nothing_and_are_reported(sdk, pipe):
    plain = sdk.images.generate(prompt="a red fox", size=f"{SIZE}x{SIZE}", extra_body=SD)
    decorated = sdk.images.generate(prompt="a red fox", size=f"{SIZE}x{SIZE}", quality="high", moderation="low",
                                    style="vivid", user="u-1", safety_identifier="h-1", background="opaque",
                                    complexity="low", response_format="b64_json", model="tiny-sd15", n=1,
                                    extra_body=SD)
    assert decorated.data[0].b64_json == plain.data[0].b64_json
    assert decorated.background == "opaque" and decorated.quality == "high" and plain.quality is None
    assert decorated.size == f"{SIZE}x{SIZE}" and decorated.output_format == "png"
    assert plain.usage.input_tokens == plain.usage.input_tokens_details.text_tokens == _tokens(pipe, "a red fox")


def test_size_auto_is_the_models_size_and_output_compression_is_the_jpeg_quality(sdk, pipe):
    auto = sdk.images.generate(prompt="a boat", size="auto", extra_body={"steps": 1})
    native = pipe.dir.default_size
    assert auto.size == f"{native}x{native}" and _pixels(auto.data[0].b64_json).shape[:2] == (native, native)
    sizes = {}
    for q in (10, 95):
        r = sdk.images.generate(prompt="a boat", size=f"{SIZE}x{SIZE}", output_format="jpeg", output_compression=q,
                                extra_body=SD)
        data = base64.b64decode(r.data[0].b64_json)
        assert Image.open(io.BytesIO(data)).format == "JPEG" and r.output_format == "jpeg"
        sizes[q] = len(data)
    assert sizes[10] < sizes[95]


# ---- edits -------------------------------------------------------------------------------------------------------

def test_edit_without_mask_is_img2img_equal_to_the_runtimes_image(sdk, pipe):
    photo = _photo()
    served = sdk.images.edit(image=_png(photo), prompt="a red circle", size=f"{SIZE}x{SIZE}", extra_body=SD)
    want = pipe.generate(Request.of(prompt="a red circle", init_image=photo, **RUNTIME))[0]
    assert np.array_equal(_pixels(served.data[0].b64_json), np.asarray(want, dtype=int))
    stronger = sdk.images.edit(image=_png(photo), prompt="a red circle", extra_body=SD | {"strength": 0.5})
    want = pipe.generate(Request.of(prompt="a red circle", init_image=photo, strength=0.5, **RUNTIME))[0]
    assert np.array_equal(_pixels(stronger.data[0].b64_json), np.asarray(want, dtype=int))
    assert stronger.size == f"{SIZE}x{SIZE}"  # size auto: the image's


def test_edit_with_an_alpha_mask_is_inpainting_equal_to_the_runtimes_image(sdk, pipe):
    photo, (mask, white_is_repaint) = _photo(5), _openai_mask()
    served = sdk.images.edit(image=_png(photo), mask=_png(mask), prompt="a lake", n=2, response_format="b64_json",
                             output_format="png", extra_body=SD)
    want = pipe.generate(Request.of(prompt="a lake", init_image=photo, mask=white_is_repaint, batch=2, **RUNTIME))
    for item, image in zip(served.data, want):
        assert np.array_equal(_pixels(item.b64_json), np.asarray(image, dtype=int))
    img2img = sdk.images.edit(image=_png(photo), prompt="a lake", extra_body=SD)
    assert not np.array_equal(_pixels(img2img.data[0].b64_json), _pixels(served.data[0].b64_json))


@pytest.mark.parametrize("case,param", [("two images", "image"), ("no alpha", "mask"), ("other size", "mask"),
                                        ("opaque mask", "mask"), ("markup", "markup"), ("not an image", "image")])
def test_bad_edits_name_the_param(sdk, case, param):
    photo = _png(_photo())
    kwargs = {"two images": {"image": [photo, photo]},
              "no alpha": {"mask": _png(Image.new("L", (SIZE, SIZE), 255))},
              "other size": {"mask": _png(Image.new("RGBA", (SIZE * 2, SIZE), (0, 0, 0, 0)))},
              "opaque mask": {"mask": _png(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255)))},
              "markup": {"markup": photo},
              "not an image": {"image": ("x.png", b"not a png", "image/png")}}[case]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.edit(**{"image": photo, "prompt": "x", "extra_body": {"steps": STEPS}, **kwargs})
    assert e.value.param == param, e.value.body


# ---- variations --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks variations deprecated
def test_variations_on_a_model_that_makes_none_are_refused(sdk):
    with pytest.raises(openai.BadRequestError, match="unCLIP") as e:
        sdk.images.create_variation(image=_png(_photo()), n=1, size="256x256")
    assert e.value.param == "model"


@pytest.mark.slow  # builds and exports the tiny unCLIP pipeline (~15 s here)
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_variations_on_an_unclip_model_equal_the_runtimes(tmp_path_factory):
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_pipelines import write_tiny
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("unclip")
    export(ExportConfig(model=str(write_tiny("unclip", root / "model")), output=root / "engine", precision="fp32",
                        components=("text_encoder", "unet", "vae_decoder", "image_encoder")))
    unclip = Pipeline.load(root / "engine", backend="ort-cpu")
    s = LoopbackServer(root / "engine", unclip)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        photo = _photo(2)
        served = client.images.create_variation(image=_png(photo), n=2, response_format="b64_json",
                                                extra_body={"steps": 2, "seed": 10, "guidance_scale": 5.0,
                                                            "noise_level": 100})
        want = unclip.generate(Request.of(prompt="", init_image=photo, steps=2, guidance=5.0, noise_level=100,
                                          seed=10, batch=2))
        assert len(served.data) == 2
        for item, image in zip(served.data, want):
            assert np.abs(_pixels(item.b64_json) - np.asarray(image, dtype=int)).max() <= 1
        with pytest.raises(openai.BadRequestError) as e:  # an unCLIP model varies; it does not edit
            client.images.edit(image=_png(photo), prompt="x")
        assert e.value.param == "image"
    finally:
        s.stop()


# ---- streaming ---------------------------------------------------------------------------------------------------

def test_generation_stream_events_as_the_sdk_parses_them(sdk, pipe):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    events = list(sdk.images.generate(prompt="a cat", size=f"{SIZE}x{SIZE}", stream=True, partial_images=2,
                                      quality="medium", extra_body=SD | {"steps": 4}))
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert (e.background, e.quality, e.size, e.output_format) == ("opaque", "medium", f"{SIZE}x{SIZE}", "png")
        assert isinstance(e.created_at, int) and e.created_at > 0
    done = events[-1]
    assert done.type == "image_generation.completed" and done.usage.input_tokens == _tokens(pipe, "a cat") > 0
    unstreamed = sdk.images.generate(prompt="a cat", size=f"{SIZE}x{SIZE}", extra_body=SD | {"steps": 4})
    assert done.b64_json == unstreamed.data[0].b64_json


def test_edit_stream_events_as_the_sdk_parses_them(sdk, pipe):
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent

    photo, (mask, _) = _photo(), _openai_mask()
    events = list(sdk.images.edit(image=_png(photo), mask=_png(mask), prompt="a lake", stream=True, partial_images=1,
                                  output_format="webp", extra_body=SD))
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    assert events[-1].output_format == "webp" and events[-1].usage.total_tokens == _tokens(pipe, "a lake")
    unstreamed = sdk.images.edit(image=_png(photo), mask=_png(mask), prompt="a lake", output_format="webp",
                                 extra_body=SD)
    assert events[-1].b64_json == unstreamed.data[0].b64_json
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.edit(image=_png(photo), prompt="x", stream=True, n=2)
    assert e.value.param == "n"


def test_random_edit_forms_never_answer_5xx(server):
    """Multipart forms of random fields and values (text and files) are answered 200 or 4xx in OpenAI's shape."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    photo, (mask, _) = _png(_photo())[1], _openai_mask()
    files = st.sampled_from([photo, _png(mask)[1], b"", b"\x89PNG not really", _png(Image.new("LA", (8, 8)))[1]])
    names = st.sampled_from(["prompt", "n", "size", "steps", "seed", "strength", "stream", "partial_images", "quality",
                             "background", "output_format", "output_compression", "mask", "model", "svg[model]",
                             "loras[]", "sampler", "guidance_scale", "user", "image", "noise", "negative_prompt"])
    values = st.one_of(st.sampled_from(["1", "2", "0", "-1", "", "auto", "32x32", "0.5", "nan", "true", "png", "webp",
                                        "tiny-sd15", "euler_a", "high", "opaque"]), st.text(max_size=12))
    form = st.lists(st.tuples(names, values), max_size=6)
    uploads = st.lists(st.tuples(st.sampled_from(["image", "image[]", "mask", "markup"]), files), max_size=3)

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(form, uploads, st.sampled_from(["/v1/images/edits", "/v1/images/variations"]))
    def check(data, parts, route):
        fields: dict[str, list[str]] = {"steps": ["1"]}  # valid forms stay cheap
        for name, value in data:
            fields.setdefault(name, []).append(value)
        response = httpx.post(server.url + route, data=fields, timeout=120,
                              files=[(name, ("f.png", content, "image/png")) for name, content in parts] or None,
                              headers={"Authorization": "Bearer k3y"})
        assert response.status_code < 500, (data, response.status_code, response.text[:300])
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
