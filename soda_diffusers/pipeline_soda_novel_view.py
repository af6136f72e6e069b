"""``SODANovelViewPipeline``: one source view (or several) in, novel views at the given rays out."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor


def _package_module(name: str):
    """``soda_diffusers.<name>``, for the methods that need the installed package. Imported by name: exported
    pipelines ship this file as it is, and Diffusers reads every import line of it as a requirement."""
    return importlib.import_module(f"soda_diffusers.{name}")


class SODAImageProcessor(VaeImageProcessor):
    """Diffusers' ``VaeImageProcessor`` (which turns the generated views into PIL images or arrays) with the
    source side SODA needs: :meth:`preprocess` makes a person's image look like the training data."""

    def preprocess(self, source_image, size: int) -> torch.Tensor:
        """Any source input -> ``(B, k, 3, size, size)`` in [-1, 1].

        * a PIL image, an ``(H, W, 3)`` array or a ``(3, H, W)`` tensor: one view;
        * a list of those: ``k`` views of one object (their latents are averaged);
        * an ``(N, H, W, 3)`` array or ``(N, 3, H, W)`` tensor: one view per target;
        * an ``(N, k, 3, H, W)`` tensor: ``k`` views per target.

        Arrays and PIL images hold the usual [0, 255] (uint8) or [0, 1] (float) values; tensors
        hold model-space values in [-1, 1], as the ``soda_diffusers.data`` loaders produce them.

        Inputs are made to look like the training data, whose backgrounds are white and whose images
        are square and area-downsampled: an alpha channel (RGBA, LA, palette transparency, an
        ``(H, W, 4)`` array) is composited onto white, grayscale (``L``, ``(H, W)`` arrays) is
        repeated to RGB, non-square images are padded to square on white, centred, and every input
        is resized by :meth:`_resize` (area averaging for integer shrinks), PIL images included.
        """
        if isinstance(source_image, (list, tuple)):
            if len(source_image) == 0:
                raise ValueError("source_image: got an empty list")
            views = [self.preprocess(view, size) for view in source_image]
            if any(view.shape[:2] != (1, 1) for view in views):
                raise ValueError("source_image: a list holds single views of one object, got a batch inside it")
            return torch.cat(views, dim=1)
        if isinstance(source_image, PIL.Image.Image):
            source_image = self._pil_to_array(source_image)
        if isinstance(source_image, np.ndarray):
            array = source_image
            if array.ndim == 2:  # grayscale
                array = array[..., None]
            if array.ndim not in (3, 4) or array.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    "source_image: expected an (H, W), (H, W, 3), (H, W, 4) or (N, H, W, 3|4) array, "
                    f"got {source_image.shape}"
                )
            if array.ndim == 3 and array.shape[-1] == 1:
                array = np.repeat(array, 3, axis=-1)
            array = array.astype(np.float32) / (255.0 if source_image.dtype == np.uint8 else 1.0)
            if array.shape[-1] == 4:
                array = self._composite_on_white(array)
            tensor = torch.from_numpy(np.ascontiguousarray(array)).movedim(-1, -3) * 2 - 1
            return self._resize(self._pad_to_square(tensor.reshape(-1, 1, *tensor.shape[-3:])), size)
        if isinstance(source_image, torch.Tensor):
            if source_image.ndim not in (3, 4, 5) or source_image.shape[-3] != 3:
                raise ValueError(
                    "source_image: expected a (3, H, W), (N, 3, H, W) or (N, k, 3, H, W) tensor, "
                    f"got {tuple(source_image.shape)}"
                )
            if not torch.isfinite(source_image).all():
                raise ValueError("source_image: contains NaN or inf")
            if source_image.min() < -1.001 or source_image.max() > 1.001:
                raise ValueError(
                    f"source_image: tensors are expected in [-1, 1], got values in "
                    f"[{source_image.min().item():.3g}, {source_image.max().item():.3g}]"
                )
            tensor = source_image.float()
            tensor = tensor.reshape(-1, 1, *tensor.shape[-3:]) if tensor.ndim < 5 else tensor
            return self._resize(self._pad_to_square(tensor), size)
        raise ValueError(f"source_image: expected a PIL image, numpy array, tensor or list, got {type(source_image)}")

    @staticmethod
    def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
        """A PIL image as a uint8 ``(H, W, 3)`` or ``(H, W, 4)`` array, keeping any transparency so that it
        can be composited onto white: ``convert("RGB")`` alone would show whatever colour the transparent
        pixels hide (usually black), a background NMR never has."""
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        )
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # High-bit-depth grayscale: convert("RGB") would clip it, so scale it to 8 bits first.
            values = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
            return np.clip(np.round(values / peak * 255.0), 0, 255).astype(np.uint8)
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))

    @staticmethod
    def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
        """``(..., 4)`` values in [0, 1] -> ``(..., 3)`` over a white background, as NMR renders are."""
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)

    @staticmethod
    def _pad_to_square(images: torch.Tensor) -> torch.Tensor:
        """``(B, k, 3, H, W)`` in [-1, 1], padded to square with white (1), centred: the model only saw
        square views, and stretching a non-square image would distort the object's shape."""
        height, width = images.shape[-2:]
        if height == width:
            return images
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        padded = images.new_ones(*images.shape[:-2], side, side)
        padded[..., top : top + height, left : left + width] = images
        return padded

    @staticmethod
    def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
        if images.shape[-2:] == (size, size):
            return images
        flat = images.flatten(0, 1)
        if flat.shape[-1] % size == 0 and flat.shape[-2] % size == 0:
            # Integer shrink (64 -> 32 px): area averaging, as NMR images are usually downsampled.
            flat = torch.nn.functional.interpolate(flat, size=(size, size), mode="area")
        else:
            flat = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", antialias=True)
        return flat.view(*images.shape[:2], 3, size, size)



class SODANovelViewPipeline(DiffusionPipeline):
    r"""Novel view synthesis with a SODA bottleneck diffusion model.

    The encoder squeezes the source view(s) into a latent ``z``; the U-Net denoises each target
    view from pure noise, seeing only its rays and ``z``. Works with any Diffusers noise scheduler
    (DDPM, DDIM, DPM-Solver, Euler, UniPC, ...): swap it with
    ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``.

    Components:
        encoder ([`SODAEncoder`]): source view(s) -> ``z``.
        unet ([`SODAUNet2DModel`]): the ``z``-modulated denoiser.
        scheduler ([`SchedulerMixin`]): the sampler.
    """

    model_cpu_offload_seq = "encoder->unet"
    _callback_tensor_inputs = ["latents", "z"]

    def __init__(self, encoder, unet, scheduler):
        super().__init__()
        self.register_modules(encoder=encoder, unet=unet, scheduler=scheduler)
        self.image_processor = SODAImageProcessor(vae_scale_factor=1, do_resize=True)

    @classmethod
    def from_preset(cls, name_or_path: str | Path, **component_overrides) -> SODANovelViewPipeline:
        """An untrained pipeline from a config-only preset directory (``model_index.json``,
        ``encoder/config.json``, ``unet/config.json``, ``scheduler/scheduler_config.json``): a name
        from the top-level ``pipelines/`` folder (``soda-tiny``, ``soda-nmr-32``, ``soda-nmr-64``)
        or a path. ``component_overrides`` maps a component to config values to change, e.g.
        ``unet={"layers_per_block": 1}``."""
        path, presets_dir = Path(name_or_path), _package_module("resources").resource_dir("presets")
        if not (path / "model_index.json").is_file():
            path = presets_dir / str(name_or_path)
        if not (path / "model_index.json").is_file():
            presets = presets_dir.iterdir() if presets_dir.is_dir() else []
            available = sorted(p.name for p in presets if (p / "model_index.json").is_file())
            raise ValueError(f"preset: expected one of {available} or a preset directory, got {str(name_or_path)!r}")
        index = json.loads((path / "model_index.json").read_text())
        components = {}
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            library, class_name = entry
            component_class = getattr(__import__(library, fromlist=[class_name]), class_name)
            config = dict(component_class.load_config(path / name))
            config.update(component_overrides.pop(name, {}))
            component = component_class.from_config(config)
            # Inference mode, as from_pretrained gives: no dropout, batch norms on their running statistics.
            components[name] = component.eval() if isinstance(component, torch.nn.Module) else component
        if component_overrides:
            raise ValueError(f"component_overrides: unknown components {sorted(component_overrides)}")
        return cls(**components)

    def preprocess_source(self, source_image) -> torch.Tensor:
        """``source_image`` as ``(B, k, 3, S, S)`` at the encoder's resolution: :meth:`SODAImageProcessor.preprocess`."""
        return self.image_processor.preprocess(source_image, self.encoder.config.sample_size)

    @torch.no_grad()
    def encode(self, source_image, source_rays: torch.Tensor | None = None) -> torch.Tensor:
        """Latent ``z`` ``(B, latent_dim)`` of the source view(s) (see :meth:`SODAImageProcessor.preprocess`).

        ``source_rays`` ``(B, k, 6, S, S)`` are needed with ``k > 1`` views: each view's rays in the
        first view's camera frame."""
        device = self._execution_device
        images = self.preprocess_source(source_image).to(device, self.encoder.dtype)
        if source_rays is not None:
            source_rays = source_rays.to(device, self.encoder.dtype)
            if source_rays.ndim == 4:
                source_rays = source_rays[None]
        return self.encoder(images, source_rays)

    def check_target_rays(self, target_rays) -> torch.Tensor:
        """``target_rays`` as ``(N, 6, S, S)`` at the U-Net's resolution, or a ValueError naming what is wrong."""
        size = self.unet.config.sample_size
        if not isinstance(target_rays, torch.Tensor):
            raise ValueError(f"target_rays: expected a tensor, got {type(target_rays)}")
        if target_rays.ndim == 3:
            target_rays = target_rays[None]
        if target_rays.ndim != 4 or tuple(target_rays.shape[1:]) != (6, size, size):
            raise ValueError(
                f"target_rays: expected (N, 6, {size}, {size}) rays [origin, direction] at the U-Net's resolution, "
                f"got {tuple(target_rays.shape)}"
            )
        if not torch.isfinite(target_rays).all():
            raise ValueError("target_rays: contains NaN or inf")
        return target_rays

    def check_inputs(self, target_rays, num_images_per_target, generator, output_type, num_inference_steps,
                     timesteps, callback_on_step_end_tensor_inputs) -> torch.Tensor:
        target_rays = self.check_target_rays(target_rays)
        if not isinstance(num_images_per_target, int) or num_images_per_target < 1:
            raise ValueError(f"num_images_per_target: expected a positive integer, got {num_images_per_target!r}")
        batch_size = target_rays.shape[0] * num_images_per_target
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator: expected one generator per image ({target_rays.shape[0]} targets x "
                f"{num_images_per_target} = {batch_size}), got {len(generator)}"
            )
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        if timesteps is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
        if timesteps is not None and "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(f"timesteps: {type(self.scheduler).__name__} does not take a custom timestep schedule")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: expected names from {self._callback_tensor_inputs}, "
                f"got {sorted(unknown)}"
            )
        return target_rays

    def prepare_latents(self, batch_size: int, dtype, device, generator, latents=None) -> torch.Tensor:
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents: expected {shape}, got {tuple(latents.shape)}")
        return latents.to(device, dtype) * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float, use_clipped_model_output: bool | None = None) -> dict:
        # Only some schedulers take eta and use_clipped_model_output (DDIM) or a generator (stochastic ones).
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if use_clipped_model_output is not None and "use_clipped_model_output" in parameters:
            kwargs["use_clipped_model_output"] = use_clipped_model_output
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        source_image,
        target_rays: torch.Tensor,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_target: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        source_rays: torch.Tensor | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate ``num_images_per_target`` images per target ray map.

        Args:
            source_image: the source view(s): see :meth:`SODAImageProcessor.preprocess`. One source for all
                targets, or one per target.
            target_rays: ``(N, 6, S, S)`` rays ``[origin, direction]`` of the target cameras, in the
                source camera's frame (``soda_diffusers.orbit_rays`` / ``nmr_rays``).
            num_inference_steps: denoising steps.
            timesteps: a custom timestep schedule (descending) for schedulers whose ``set_timesteps`` takes
                one; overrides ``num_inference_steps``.
            guidance_scale: classifier-free guidance weight ``w`` in
                ``eps = eps_uncond + w * (eps_cond - eps_uncond)``; 1 uses the conditional model alone.
            num_images_per_target: samples per target view, consecutive in the output (``N * n`` images).
            generator: a generator, or one per output image for batch-independent results.
            latents: initial noise ``(N * n, 3, S, S)`` instead of drawing it from ``generator``.
            output_type: ``"pil"``, ``"np"`` (``(N, S, S, 3)`` in [0, 1]) or ``"pt"`` (``(N, 3, S, S)`` in [0, 1]).
            source_rays: rays of the source views (needed with several views per object).
            eta: DDIM's stochasticity (0: deterministic).
            use_clipped_model_output: DDIM's option (as in Diffusers' ``DDIMPipeline``): with the scheduler's
                ``clip_sample``, derive the step's noise estimate from the clipped clean-image estimate too.
            callback_on_step_end: ``callback_on_step_end(pipe, i, t, callback_kwargs)`` called after each step
                with the tensors named in ``callback_on_step_end_tensor_inputs`` (from
                ``pipe._callback_tensor_inputs``); a tensor in the dict it returns replaces the pipeline's.
                Setting ``pipe._interrupt = True`` there skips the remaining steps.
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        target_rays = self.check_inputs(target_rays, num_images_per_target, generator, output_type,
                                        num_inference_steps, timesteps, callback_on_step_end_tensor_inputs)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        num_targets = target_rays.shape[0]
        batch_size = num_targets * num_images_per_target

        z = self.encode(source_image, source_rays)
        if z.shape[0] not in (1, num_targets):
            raise ValueError(
                f"source_image: expected 1 source or one per target ({num_targets}), got {z.shape[0]} sources"
            )
        z = z.expand(num_targets, -1).repeat_interleave(num_images_per_target, dim=0).to(self.unet.dtype)
        target_rays = target_rays.to(device, self.unet.dtype).repeat_interleave(num_images_per_target, dim=0)
        if self.do_classifier_free_guidance:
            # The unconditional branch is the model with its latent dropped, as in training.
            target_rays = torch.cat([target_rays, target_rays])

        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(batch_size, self.unet.dtype, device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta, use_clipped_model_output)

        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)
            if self.do_classifier_free_guidance:
                prediction = self.unet(torch.cat([model_input, model_input]), t, target_rays,
                                       torch.cat([torch.zeros_like(z), z])).sample
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            else:
                prediction = self.unet(model_input, t, target_rays, z).sample
            latents = self.scheduler.step(prediction, t, latents, **extra_step_kwargs).prev_sample

            if callback_on_step_end is not None:
                tensors = {"latents": latents, "z": z}
                outputs = callback_on_step_end(self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})
                latents, z = outputs.pop("latents", latents), outputs.pop("z", z)

        images = self.image_processor.postprocess(latents.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> SODANovelViewPipeline:
        """Diffusers' ``from_pretrained``. Folders and repos written by :func:`soda_diffusers.hub.export_for_hub`
        bundle source files so they load without this package; here they load with this package's own classes
        and none of the bundled code runs."""
        with _package_module("hub").package_layout(pretrained_model_name_or_path, **kwargs) as path:
            pipe = super().from_pretrained(path, **kwargs)
        if path != str(pretrained_model_name_or_path):
            # Loaded through a temporary mirror: keep the name the user passed, not the mirror's.
            pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
            for name, component in pipe.components.items():
                if "_name_or_path" in getattr(component, "config", {}):
                    component.register_to_config(_name_or_path=str(Path(pretrained_model_name_or_path) / name))
        return pipe

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        *,
        training_dir: str | Path | None = None,
        metrics: str | Path | dict | None = None,
        samples: list[str | Path] | None = None,
        dataset: str | None = None,
    ):
        """Upload the pipeline to the Hub model repo ``repo_id`` (created if needed) as one commit that
        deletes nothing else there: weights, a model card and the source files that let it load without
        this package (see :func:`soda_diffusers.hub.export_for_hub` for the layout and the arguments).

        Raises ``soda_diffusers.hub.HubUploadError`` when the Hub cannot be reached or refuses (no token:
        ``hf auth login`` or ``HF_TOKEN``); the exported folder is then kept and its path given.
        """
        return _package_module("hub").push_to_hub(
            self, repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr,
            training_dir=training_dir, metrics=metrics, samples=samples, dataset=dataset,
        )
