"""The interactive demo behind ``soda-nvs demo``: a Gradio Blocks app and the plain functions it calls.

The functions (:func:`load_upload`, :func:`slider_rays`, :func:`generate_view`, :func:`render_orbit`) know
nothing of Gradio, so they are unit-tested without a browser, and this module imports without Gradio
installed: only :func:`build_app` needs it, and it says how to install it when it is missing.
"""

from __future__ import annotations

import inspect
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from diffusers.utils import export_to_gif

# Relative: a Space ships this module and these as they are, in its own folder (soda_diffusers.hub.space).
from .cameras import (
    NMR_AZIMUTH_STEP_DEG,
    NMR_ELEVATION_DEG,
    NMR_NUM_VIEWS,
    nmr_rays,
    orbit_rays,
)
from .schedules import set_scheduler

INSTALL_HINT = 'the demo needs Gradio: pip install -e ".[demo]"  (or: pip install "gradio>=4")'
# Display names in the page -> schedules.SCHEDULERS keys.
SCHEDULER_CHOICES = {"DDIM": "ddim", "DPM-Solver": "dpmsolver", "Euler": "euler", "UniPC": "unipc"}
# Uploads beyond these are refused before decoding: the model sees 32-64 px, and decoding a 50-megapixel
# image would take seconds and hundreds of MB per request for nothing.
MAX_UPLOAD_PIXELS = 16_000_000
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# Results are a few dozen pixels: shown this tall (CSS-scaled; the files keep the model's resolution).
PREVIEW_HEIGHT = 256
# Gradio shows a 16-32 px image at its own size; fill the box instead, with visible pixels rather than a blur.
DEMO_CSS = """
#source img, #novel img, #orbit img, #real-orbit img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""


class UploadError(ValueError):
    """An upload the demo cannot use; its message is shown in the page as it is."""


def require_gradio():
    """Gradio, or an ImportError whose message is the one line that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return gradio


def load_upload(path: str | Path | None, max_pixels: int = MAX_UPLOAD_PIXELS,
                max_bytes: int = MAX_UPLOAD_BYTES) -> PIL.Image.Image:
    """The uploaded file as a decoded PIL image, or an :class:`UploadError` saying what is wrong with it.

    The size is read from the header before any pixel is decoded, so an oversized image costs nothing."""
    if path is None:
        raise UploadError("No file was uploaded.")
    path = Path(path)
    if not path.is_file():
        raise UploadError(f"The upload {path.name!r} did not arrive; try again.")
    num_bytes = path.stat().st_size
    if num_bytes == 0:
        raise UploadError(f"{path.name!r} is empty (0 bytes): upload an image file (PNG, JPEG, WebP...).")
    if num_bytes > max_bytes:
        raise UploadError(f"{path.name!r} is {num_bytes / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError:
        raise UploadError(f"{path.name!r} is far too large an image; use one under "
                          f"{max_pixels / 1e6:.0f} megapixels.") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise UploadError(f"{path.name!r} is not an image this demo can read (PNG, JPEG, WebP, GIF, BMP...).") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(f"{path.name!r} is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                          f"{max_pixels / 1e6:.0f} megapixels. The model sees a few dozen pixels: downscale it first.")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise UploadError(f"{path.name!r} could not be decoded ({error}); is the file complete?") from None
    return image


def slider_rays(azimuth_deg: float, elevation_deg: float, size: int) -> torch.Tensor:
    """Rays ``(1, 6, size, size)`` of the target camera the sliders describe: ``azimuth_deg`` around the
    object from the source view, both cameras at ``elevation_deg`` and the NMR rig's distance."""
    return orbit_rays([float(azimuth_deg)], elevation_deg=float(elevation_deg), size=size, source_azimuth_deg=0.0)


def orbit_azimuths(num_views: int = NMR_NUM_VIEWS) -> list[float]:
    """Azimuths of a full turn starting at the source view, in the rig's 15 degree steps for 24 views."""
    return [NMR_AZIMUTH_STEP_DEG * NMR_NUM_VIEWS / num_views * i for i in range(num_views)]


def orbit_camera_rays(elevation_deg: float, size: int, num_views: int = NMR_NUM_VIEWS) -> torch.Tensor:
    return orbit_rays(orbit_azimuths(num_views), elevation_deg=float(elevation_deg), size=size, source_azimuth_deg=0.0)


def model_to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A ``(3, H, W)`` model-space image in [-1, 1] as an 8-bit PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array)


def seen_by_model(pipe, source) -> PIL.Image.Image:
    """The source as the encoder sees it (composited on white, squared, resized), for the page to show."""
    return model_to_pil(pipe.preprocess_source(source)[0, 0])


@dataclass
class Settings:
    """The sampling settings of one result, which the page prints beside it."""

    scheduler: str = "DDIM"
    steps: int = 25
    guidance: float = 1.0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def describe(self, seconds: float) -> str:
        extra = "".join(f", {key} {value}" for key, value in self.extra.items())
        return (f"{self.scheduler}, {self.steps} steps, guidance {self.guidance:g}, seed {self.seed}{extra}"
                f" — {seconds:.2f} s")


# The pipeline's scheduler is swapped per request; one request at a time keeps each result's sampler its own.
_PIPE_LOCK = threading.Lock()


def _use_scheduler(pipe, name: str, base_scheduler) -> None:
    if name not in SCHEDULER_CHOICES:
        raise ValueError(f"scheduler: expected one of {list(SCHEDULER_CHOICES)}, got {name!r}")
    # Start from the pipeline's own scheduler each time, so no config key is lost switching back and forth.
    pipe.scheduler = base_scheduler
    set_scheduler(pipe, SCHEDULER_CHOICES[name])


def generate_view(pipe, source, azimuth_deg: float, elevation_deg: float, settings: Settings,
                  base_scheduler=None) -> PIL.Image.Image:
    """One novel view of ``source`` from the camera the sliders describe."""
    rays = slider_rays(azimuth_deg, elevation_deg, pipe.unet.config.sample_size)
    return render_views(pipe, source, rays, settings, base_scheduler)[0]


def render_views(pipe, source, rays: torch.Tensor, settings: Settings, base_scheduler=None,
                 chunk: int = 4, progress: Callable[[float, str], None] | None = None) -> list[PIL.Image.Image]:
    """Novel views at ``rays``, view ``i`` drawn from seed ``settings.seed + i``: independent of ``chunk``
    (the batch the pipeline runs at once), which only sets how often ``progress(fraction, text)`` is told."""
    base_scheduler = pipe.scheduler if base_scheduler is None else base_scheduler
    images = []
    with _PIPE_LOCK:
        original = pipe.scheduler
        try:
            _use_scheduler(pipe, settings.scheduler, base_scheduler)
            for start in range(0, rays.shape[0], chunk):
                stop = min(start + chunk, rays.shape[0])
                if progress is not None:
                    progress(start / rays.shape[0], f"views {start + 1}-{stop} of {rays.shape[0]}")
                generators = [torch.Generator().manual_seed(settings.seed + i) for i in range(start, stop)]
                images += pipe(source, rays[start:stop], num_inference_steps=int(settings.steps),
                               guidance_scale=float(settings.guidance), generator=generators).images
        finally:
            pipe.scheduler = original
    if progress is not None:
        progress(1.0, "done")
    return images


def render_orbit(pipe, source, settings: Settings, elevation_deg: float = NMR_ELEVATION_DEG,
                 num_views: int = NMR_NUM_VIEWS, rays: torch.Tensor | None = None, base_scheduler=None,
                 chunk: int = 4, progress: Callable[[float, str], None] | None = None) -> list[PIL.Image.Image]:
    """The orbit of ``num_views`` views around ``source``, starting at it: the cameras of
    :func:`orbit_camera_rays`, or ``rays`` (an object's own cameras, for comparison with its real views)."""
    if rays is None:
        rays = orbit_camera_rays(elevation_deg, pipe.unet.config.sample_size, num_views)
    return render_views(pipe, source, rays, settings, base_scheduler, chunk=chunk, progress=progress)


def real_orbit(item: dict, source_view: int, size: int) -> tuple[list[PIL.Image.Image], torch.Tensor]:
    """An NMR object's real views going round from ``source_view``, and its cameras' rays for them, so that the
    generated orbit is drawn from exactly the cameras of the real one."""
    views = [(source_view + i) % NMR_NUM_VIEWS for i in range(NMR_NUM_VIEWS)]
    images = [model_to_pil(item["images"][view]) for view in views]
    return images, nmr_rays(item["cameras"], source_view, views, size)


def save_orbit_gif(images: Sequence[PIL.Image.Image], name: str = "orbit") -> str:
    folder = Path(tempfile.mkdtemp(prefix="soda-demo-"))
    return export_to_gif(list(images), str(folder / f"{name}.gif"), fps=8)


def build_app(pipe, data=None, title: str = "SODA novel view synthesis"):
    """The Gradio Blocks app around ``pipe`` (and the objects of ``data``, a
    :class:`soda_diffusers.commands.demo.DemoData`); launch it with :func:`launch_app`."""
    gr = require_gradio()
    base_scheduler = pipe.scheduler
    size = pipe.unet.config.sample_size

    def on_upload(path):
        try:
            image = load_upload(path)
            preview = seen_by_model(pipe, image)
        except UploadError as error:
            gr.Warning(str(error))
            return None, None, f"⚠️ {error}"
        except ValueError as error:
            gr.Warning(str(error))
            return None, None, f"⚠️ This image cannot be used: {error}"
        status = f"Loaded {Path(path).name} ({image.width}x{image.height}, {image.mode}); the model sees it as shown."
        return {"image": image, "item": None, "view": None}, preview, status

    def on_pick(object_id, evt: gr.SelectData):
        view = int(evt.index)
        item = data.item(object_id)
        source = item["images"][view]
        return ({"image": source, "item": object_id, "view": view}, model_to_pil(source),
                f"Source: {object_id}, view {view}.")

    def settings_from(scheduler, steps, guidance, seed, **extra):
        return Settings(scheduler, int(steps), float(guidance), int(seed), extra)

    def require_source(source):
        if not source:
            raise gr.Error("Upload an image (or pick an object's view) first.")
        return source["image"]

    def on_generate(source, azimuth, elevation, scheduler, steps, guidance, seed):
        image = require_source(source)
        settings = settings_from(scheduler, steps, guidance, seed, azimuth=f"{azimuth:g}°",
                                 elevation=f"{elevation:g}°")
        start = time.perf_counter()
        view = generate_view(pipe, image, azimuth, elevation, settings, base_scheduler)
        return view, settings.describe(time.perf_counter() - start)

    def on_orbit(source, elevation, scheduler, steps, guidance, seed, progress=gr.Progress()):  # noqa: B008
        image = require_source(source)
        real, rays, extra = None, None, {"elevation": f"{elevation:g}°"}
        if source.get("item") is not None:
            real_images, rays = real_orbit(data.item(source["item"]), source["view"], size)
            real, extra = save_orbit_gif(real_images, "real-orbit"), {"cameras": "the object's own"}
        settings = settings_from(scheduler, steps, guidance, seed, views=NMR_NUM_VIEWS, **extra)
        start = time.perf_counter()
        images = render_orbit(pipe, image, settings, elevation, rays=rays, base_scheduler=base_scheduler,
                              progress=lambda fraction, text: progress(fraction, desc=text))
        seconds = time.perf_counter() - start
        return save_orbit_gif(images), real, settings.describe(seconds)

    # Gradio 4-5 take the page's CSS in Blocks(), Gradio 6 in launch() (see launch_app).
    blocks_css = {"css": DEMO_CSS} if "css" in inspect.signature(gr.Blocks.__init__).parameters else {}
    with gr.Blocks(title=title, **blocks_css) as app:
        gr.Markdown(f"# {title}\nOne picture of an object in; the camera turns around it. The model works at "
                    f"{size}x{size} px on a white background: transparent images are put on white and "
                    "non-square ones padded to square.")
        source_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Source image (PNG, JPEG, WebP...)", type="filepath", elem_id="upload")
                if data is not None:
                    object_id = gr.Dropdown(data.object_ids, value=data.object_ids[0] if data.object_ids else None,
                                            label="…or a held-out test object", elem_id="object")
                    gallery = gr.Gallery(label="Click a view to use it as the source", columns=8,
                                         elem_id="gallery", allow_preview=False)
                source_preview = gr.Image(label="Source, as the model sees it", type="pil", format="png",
                                          interactive=False, elem_id="source", height=PREVIEW_HEIGHT)
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            with gr.Column():
                azimuth = gr.Slider(0, 360, value=90, step=1, label="Azimuth (° from the source view)",
                                    elem_id="azimuth")
                elevation = gr.Slider(-10, 60, value=NMR_ELEVATION_DEG, step=1, label="Elevation (°)",
                                      elem_id="elevation")
                scheduler = gr.Radio(list(SCHEDULER_CHOICES), value="DDIM", label="Scheduler", elem_id="scheduler")
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 5, value=1.0, step=0.1, label="Guidance", elem_id="guidance")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    orbit_button = gr.Button("Orbit (24 views)", elem_id="orbit-button")
            with gr.Column():
                novel = gr.Image(label="Novel view", type="pil", format="png", interactive=False, elem_id="novel",
                                 height=PREVIEW_HEIGHT)
                novel_info = gr.Textbox(label="Novel view: settings and time", interactive=False,
                                        elem_id="novel-info")
                with gr.Row():
                    orbit = gr.Image(label="Generated orbit", type="filepath", interactive=False, elem_id="orbit",
                                     height=PREVIEW_HEIGHT)
                    real = gr.Image(label="Real orbit", type="filepath", interactive=False, elem_id="real-orbit",
                                    visible=data is not None, height=PREVIEW_HEIGHT)
                orbit_info = gr.Textbox(label="Orbit: settings and time", interactive=False, elem_id="orbit-info")

        upload.upload(on_upload, upload, [source_state, source_preview, status])
        if data is not None:
            object_id.change(data.gallery, object_id, gallery)
            app.load(data.gallery, object_id, gallery)
            gallery.select(on_pick, object_id, [source_state, source_preview, status])
        sampling = [scheduler, steps, guidance, seed]
        generate_button.click(on_generate, [source_state, azimuth, elevation, *sampling], [novel, novel_info])
        orbit_button.click(on_orbit, [source_state, elevation, *sampling], [orbit, real, orbit_info])
    return app


def launch_app(app, **launch_kwargs):
    """``app.queue().launch(...)`` (the queue carries Orbit's progress), with the page's CSS where this Gradio
    version takes it in ``launch``."""
    if "css" in inspect.signature(app.launch).parameters:
        launch_kwargs.setdefault("css", DEMO_CSS)
    return app.queue().launch(**launch_kwargs)
