"""The demo's plain functions, without a browser (and without Gradio, except where marked)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BLOCK_PACKAGE, TINY_SIZE, make_tiny_pipeline

from soda_diffusers import orbit_rays
from soda_diffusers.cameras import nmr_rays
from soda_diffusers.cli import main
from soda_diffusers.commands.demo import DemoData
from soda_diffusers.data.synthetic import make_synthetic_nmr
from soda_diffusers.demo import (
    SCHEDULER_CHOICES,
    Settings,
    UploadError,
    generate_view,
    load_upload,
    orbit_azimuths,
    real_orbit,
    render_orbit,
    slider_rays,
)


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def source_image(size=TINY_SIZE * 2):
    array = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    return PIL.Image.fromarray(array)


@pytest.mark.parametrize("azimuth, elevation", [(0, 30), (90, 30), (200, 10), (360, 45)])
def test_the_camera_from_the_sliders_is_orbit_rays_at_those_angles(azimuth, elevation):
    expected = orbit_rays([azimuth], elevation_deg=elevation, size=TINY_SIZE, source_azimuth_deg=0.0)
    torch.testing.assert_close(slider_rays(azimuth, elevation, TINY_SIZE), expected, atol=0, rtol=0)
    # Azimuth is relative to the source view: the same turn from any source azimuth is the same camera.
    shifted = orbit_rays([azimuth + 40], elevation_deg=elevation, size=TINY_SIZE, source_azimuth_deg=40.0)
    torch.testing.assert_close(slider_rays(azimuth, elevation, TINY_SIZE), shifted, atol=1e-5, rtol=0)


def test_the_orbit_is_the_pipelines_output_for_the_same_seed(pipe):
    settings = Settings("DDIM", steps=1, guidance=1.0, seed=7)
    fractions = []
    orbit = render_orbit(pipe, source_image(), settings, elevation_deg=20.0, chunk=5,
                         progress=lambda fraction, text: fractions.append(fraction))
    rays = orbit_rays(orbit_azimuths(), elevation_deg=20.0, size=TINY_SIZE)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(24)]
    expected = pipe(source_image(), rays, num_inference_steps=1, generator=generators).images
    assert len(orbit) == 24 and orbit[0].size == (TINY_SIZE, TINY_SIZE)
    difference = np.abs(np.stack(orbit).astype(int) - np.stack(expected).astype(int))
    assert difference.max() <= 1  # batches of 5 against one of 24: float rounding, never a different image
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1 and len(fractions) == 6


def test_a_generated_view_is_the_orbit_frame_at_that_azimuth_and_seed(pipe):
    view = generate_view(pipe, source_image(), 45.0, 30.0, Settings(steps=3, seed=3))
    generator = torch.Generator().manual_seed(3)
    expected = pipe(source_image(), orbit_rays([45.0], size=TINY_SIZE), num_inference_steps=3, generator=generator)
    assert np.abs(np.asarray(view).astype(int) - np.asarray(expected.images[0]).astype(int)).max() <= 1


def test_every_scheduler_runs_and_the_pipelines_own_is_restored(pipe):
    original = pipe.scheduler
    results = {}
    for name in SCHEDULER_CHOICES:
        results[name] = np.asarray(generate_view(pipe, source_image(), 90.0, 30.0, Settings(name, steps=4)))
        assert pipe.scheduler is original
    assert not np.array_equal(results["DDIM"], results["Euler"])
    with pytest.raises(ValueError, match="scheduler"):
        generate_view(pipe, source_image(), 90.0, 30.0, Settings("PLMS", steps=2))
    assert pipe.scheduler is original


def test_settings_describe_what_made_a_result():
    text = Settings("UniPC", 20, 2.5, 11, {"azimuth": "90°"}).describe(1.234)
    assert text == "UniPC, 20 steps, guidance 2.5, seed 11, azimuth 90° — 1.23 s"


def test_bad_uploads_get_a_message_that_says_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a picture")
    truncated = tmp_path / "truncated.png"
    source_image(64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    huge = tmp_path / "huge.png"
    PIL.Image.new("L", (10_000, 5_000), 255).save(huge)  # 50 megapixels, a few kB compressed
    for path, match in [(empty, "empty"), (not_image, "not an image"), (huge, "50 megapixels"),
                        (truncated, "decoded"), (tmp_path / "missing.png", "did not arrive"), (None, "No file")]:
        with pytest.raises(UploadError, match=match):
            load_upload(path)
    good = tmp_path / "good.png"
    PIL.Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(good)
    image = load_upload(good)
    assert image.size == (40, 20) and image.mode == "RGBA"


def test_the_real_orbit_starts_at_the_source_view_and_its_cameras_are_the_objects(tmp_path, pipe):
    root = make_synthetic_nmr(tmp_path / "nmr", 3, categories=["airplane"])  # one per split
    data = DemoData(root, TINY_SIZE)
    assert len(data.object_ids) >= 1 and len(data.gallery(data.object_ids[0])) == 24
    item = data.item(data.object_ids[0])
    images, rays = real_orbit(item, 5, TINY_SIZE)
    assert len(images) == 24 and images[0].size == (TINY_SIZE, TINY_SIZE)
    expected = ((item["images"][5] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(images[0]), expected)
    torch.testing.assert_close(rays, nmr_rays(item["cameras"], 5, [(5 + i) % 24 for i in range(24)], TINY_SIZE))
    # The synthetic rig is the NMR rig: the object's cameras are orbit_rays' cameras, 15 degrees apart.
    torch.testing.assert_close(rays, orbit_rays(orbit_azimuths(), size=TINY_SIZE), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_demo_imports_and_explains_itself_without_gradio():
    code = (
        "import sys; sys.modules['gradio'] = None\n"
        "import soda_diffusers.demo\n"
        "from soda_diffusers.cli import main\n"
        "sys.exit(main(['demo', '--pipeline', 'nowhere']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[demo]"' in lines[0]


def test_the_app_builds_around_a_tiny_pipeline(pipe):
    gr = pytest.importorskip("gradio")
    app = __import__("soda_diffusers.demo", fromlist=["build_app"]).build_app(pipe)
    assert isinstance(app, gr.Blocks)


# --- End to end, in a real headless browser --------------------------------------------------------------



def browser_requirements_or_skip():
    """Gradio, Selenium and Debian's Chromium, or a skip that says what is missing (the reason shows with -ra)."""
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[demo]'")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver")
    return webdriver, chromium, chromedriver


def browser_or_skip():
    webdriver, chromium, chromedriver = browser_requirements_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], folder: Path, env: dict | None = None):
    """Start ``command``, a Gradio server on 127.0.0.1, and wait until it answers: ``(process, url, log)``."""
    port = free_port()
    log = open(folder / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), **(env or {})}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return server, url, log
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                pytest.fail(f"the app did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)


def stop(server, log) -> None:
    server.terminate()
    server.wait(timeout=30)
    log.close()


def export_space_dry_run(folder: Path) -> Path:
    """``soda-nvs push --space --dry-run`` of a saved tiny pipeline: the model folder and the Space folder."""
    make_tiny_pipeline().save_pretrained(folder / "tiny")
    out = folder / "upload"
    assert main(["push", "--pipeline", str(folder / "tiny"), "--repo-id", "someone/tiny", "--space",
                 "someone/tiny-demo", "--dry-run", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=["soda-nvs demo", "Space app.py"])
def served_demo(request, tmp_path_factory):
    """The demo on a tiny pipeline, serving this machine only (127.0.0.1): started by ``soda-nvs demo``, or as
    the exported Space's ``app.py`` in a process that cannot import soda_diffusers, on the exported model folder."""
    browser_requirements_or_skip()  # before starting a server no browser will visit
    folder = tmp_path_factory.mktemp("demo")
    if request.param == "soda-nvs demo":
        make_tiny_pipeline().save_pretrained(folder / "tiny")
        command = [sys.executable, "-m", "soda_diffusers.cli", "demo", "--pipeline", str(folder / "tiny")]
        env = {}
    else:
        out = export_space_dry_run(folder)
        app = out / "space" / "app.py"
        command = [sys.executable, "-c", BLOCK_PACKAGE + f"import runpy; runpy.run_path({str(app)!r}, run_name='__main__')"]
        env = {"SODA_PIPELINE": str(out / "model"), "HF_HUB_OFFLINE": "1"}
    server, url, log = serve(command, folder, env)
    yield url, folder
    stop(server, log)


@pytest.mark.slow
def test_in_a_browser_generate_shows_a_view_and_a_bad_upload_an_error(served_demo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = served_demo
    driver = browser_or_skip()
    wait = WebDriverWait(driver, 120)
    try:
        def upload(path: Path):
            driver.get(url)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
            driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))

        def status() -> str:
            return driver.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value") or ""

        not_image = folder / "notes.txt"
        not_image.write_text("not a picture")
        upload(not_image)
        wait.until(lambda d: status())
        assert "not an image" in status()

        source = folder / "source.png"
        PIL.Image.fromarray((np.random.default_rng(0).random((40, 64, 4)) * 255).astype(np.uint8), "RGBA").save(source)
        upload(source)  # the same server, after the bad upload: it kept serving
        wait.until(lambda d: "Loaded" in status())
        driver.find_element(By.ID, "generate").click()
        novel = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#novel img[src]"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", novel))
        size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", novel)
        assert size == [TINY_SIZE, TINY_SIZE]
        info = driver.find_element(By.CSS_SELECTOR, "#novel-info textarea").get_attribute("value")
        assert "DDIM, 25 steps" in info and " s" in info

        driver.find_element(By.ID, "orbit-button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#orbit img[src]"))
        wait.until(lambda d: "views 24" in d.find_element(By.CSS_SELECTOR, "#orbit-info textarea").get_attribute("value"))
        # The README's docs/demo.png is taken the same way, with a trained pipeline.
        assert driver.save_screenshot(str(folder / "demo.png")) and (folder / "demo.png").stat().st_size > 0
    finally:
        driver.quit()
