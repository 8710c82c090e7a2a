"""`sdrt serve` in a real browser: Debian's headless Chromium driven by Selenium (chromedriver from Debian's
chromium-driver; the Makefile's `browser` target installs both where it can, and these tests skip, saying why, where
they are missing). The server runs on loopback in this process; the browser resolves no other host, so the pages
must work without the internet.

Checked: /docs renders its route list from the package's own files; on `/`, a typed prompt and Generate give the
image the API gives for the same seed (streamed through the tiny VAE's previews); a bad value shows the server's
message beside its field; `?…&generate=1` generates on load; a server with an API key asks for it, and the page
works once it is given."""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra installs it)")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no chromium/chromedriver on this machine (`make browser` installs Debian's chromium and "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import LoopbackServer  # noqa: E402

STEPS = 3
SEED = 11


@pytest.fixture(scope="module")
def engine(exported, tiny_pipeline, tmp_path_factory):
    """The session's sd15 export with a tiny VAE added, so the page streams previews."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.extras.tiny_vae import write_tiny_vae

    taesd = write_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd", scale_factor=2)
    out = tmp_path_factory.mktemp("playground") / "sd15-tiny"
    shutil.copytree(exported("sd15", "fp32"), out)
    export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32", tiny_vae=str(taesd)))
    return out


@pytest.fixture(scope="module")
def pipeline(engine):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(engine, backend="ort-cpu")


@pytest.fixture(scope="module")
def server(engine, pipeline):
    s = LoopbackServer(engine, pipeline)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # no host but loopback resolves
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _api_image(server, prompt: str, seed: int, steps: int) -> np.ndarray:
    body = {"prompt": prompt, "seed": seed, "steps": steps}
    response = httpx.post(server.url + "/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return _pixels(response.json()["data"][0]["b64_json"])


def _result(browser, timeout: float = 90) -> tuple[np.ndarray, str, str]:
    image = WebDriverWait(browser, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.result"))[0]
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    caption = browser.find_element(By.CSS_SELECTOR, "#images figcaption").text
    return _pixels(src.split(",", 1)[1]), image.get_attribute("data-seed"), caption


def _ready(browser, url: str):
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def test_docs_render_offline(server, browser):
    browser.get(server.url + "/docs")
    operations = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert len(operations) >= 10 and "/v1/images/generations" in paths and "/sdapi/v1/txt2img" in paths
    assert all(src.startswith(server.url) for src in
               browser.execute_script("return [...document.scripts].map(s => s.src).filter(Boolean)"))


def test_root_is_the_page_for_browsers_and_a_404_for_api_clients(server):
    page = httpx.get(server.url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/playground/playground.js" in page.text and "http" not in page.text.replace(server.url, "")
    api = httpx.get(server.url + "/")
    assert api.status_code == 404 and api.json()["error"]["type"] == "not_found"


def test_typing_a_prompt_and_generating_gives_the_apis_image(server, browser):
    _ready(browser, server.url + "/")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a red circle")
    for field, value in (("steps", STEPS), ("seed", SEED)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    browser.find_element(By.ID, "generate").click()
    shown, seed, caption = _result(browser)
    assert seed == str(SEED) and f"Seed: {SEED}" in caption and f"Steps: {STEPS}" in caption
    assert np.array_equal(shown, _api_image(server, "a red circle", SEED, STEPS))
    assert f"seed={SEED}" in browser.current_url and "prompt=a+red+circle" in browser.current_url
    link = browser.find_element(By.CSS_SELECTOR, "#images a[download]")
    assert link.get_attribute("download") == f"sdrt-{SEED}.png"


def test_a_bad_value_shows_the_servers_message_beside_its_field(server, browser):
    _ready(browser, server.url + "/?prompt=x&steps=0&seed=1")
    browser.find_element(By.ID, "generate").click()
    slot = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '.error[data-for="steps"]').text or None)
    expected = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "steps": 0}).json()
    assert slot == expected["error"]["message"]
    assert "invalid" in browser.find_element(By.ID, "steps").get_attribute("class")
    assert not browser.find_elements(By.CSS_SELECTOR, "img.result")


def test_an_address_with_generate_1_generates_on_load(server, browser):
    browser.get(server.url + f"/?prompt=a+blue+square&seed=7&steps={STEPS}&generate=1")
    shown, seed, _ = _result(browser)
    assert seed == "7" and np.array_equal(shown, _api_image(server, "a blue square", 7, STEPS))


def test_a_server_with_a_key_asks_for_it(engine, pipeline, browser):
    s = LoopbackServer(engine, pipeline, api_key="sesame")
    try:
        browser.get(s.url + f"/?prompt=a+circle&seed=3&steps={STEPS}&generate=1")
        key = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "key") if
                                               d.find_element(By.ID, "key-form").is_displayed() else None)
        key.send_keys("sesame")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        shown, seed, _ = _result(browser)
        assert seed == "3" and not browser.find_element(By.ID, "key-form").is_displayed()
        headers = {"Authorization": "Bearer sesame"}
        api = httpx.post(s.url + "/v1/images/generations", headers=headers,
                         json={"prompt": "a circle", "seed": 3, "steps": STEPS}, timeout=120).json()
        assert np.array_equal(shown, _pixels(api["data"][0]["b64_json"]))
    finally:
        s.stop()


def test_inpainting_with_an_uploaded_image_and_a_painted_mask_gives_the_apis_image(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    rng = np.random.default_rng(0)
    path = tmp_path / "start.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    _ready(browser, server.url + f"/?prompt=a+green+star&seed=21&steps={STEPS}")
    Select(browser.find_element(By.ID, "mode")).select_by_value("img2img")
    browser.find_element(By.ID, "init-image").send_keys(str(path))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "width").get_attribute("value") == "64")
    canvas = browser.find_element(By.ID, "mask-canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -5).click_and_hold() \
        .move_by_offset(20, 10).release().perform()
    mask = browser.execute_script("return maskPng().split(',')[1]")
    painted = _pixels(mask)
    assert 0 < (painted > 127).mean() < 1  # some of the image, not all of it
    browser.find_element(By.ID, "generate").click()
    shown, seed, caption = _result(browser)
    body = {"prompt": "a green star", "negative_prompt": "", "width": 64, "height": 48, "steps": STEPS,
            "cfg_scale": 7.5, "seed": 21, "batch_size": 1, "denoising_strength": 0.75,
            "init_images": [base64.b64encode(path.read_bytes()).decode()], "mask": mask}
    api = httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert api.status_code == 200, api.text
    assert seed == "21" and np.array_equal(shown, _pixels(api.json()["images"][0]))
    outside = painted[..., 0] < 128
    start = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(shown.astype(int) - start)[outside].mean() < np.abs(shown.astype(int) - start)[~outside].mean()
