"""How a benchmark is sampled and scored: this project's way, or the authors' — one switch.

``model.protocol: authors`` reproduces what the authors' release does when it makes the paper's
tables; ``project`` (the default) keeps this project's choices. Each part is also an option of
its own, and an option that is set explicitly wins over the protocol:

| part | option | ``project`` | ``authors`` |
|---|---|---|---|
| DreamBench subject references | ``data.benchmark.reference_prep`` | ``raw`` (the photo) | ``mask_file`` (the subject on black) |
| generated images before scoring | ``model.eval_metrics.jpeg_quality`` | lossless | JPEG round trip at 75 (PIL's default) |
| MIGEBench subject crop | ``model.eval_metrics.crop_fn`` | ``mask`` (box of the mask) | ``mask_black`` (box, background black) |
| timesteps the DiT embeds | ``model.timestep_dtype`` | ``float32`` | ``bfloat16`` (their bf16 model casts t) |
| latents of references and source | ``model.condition_latents`` | ``mode`` | ``sample`` (seeded from the request's seed) |
| resize on the autoencoder path | ``model.image_resize`` | ``project`` (bicubic, centre crop) | ``authors`` (bilinear; subject references letterboxed on black) |
| DPM-Solver++ time grid | ``model.sampler_time_grid`` | ``diffusers`` | ``authors`` (fractional, ends at t = 1/N) |
| eps of the ViT's final LayerNorm | ``model.overrides.vision_norm_eps`` | the vision config's (1e-6) | ``1e-5`` (BLIP-2's ``ln_vision``) |

The facts behind the ``authors`` column (from their public release) and the size of each
difference are in docs/AUTHORS_CHECKPOINT.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

TIMESTEP_DTYPES = ("float32", "bfloat16")
CONDITION_LATENTS = ("mode", "sample")
IMAGE_RESIZES = ("project", "authors")
TIME_GRIDS = ("diffusers", "authors")


@dataclass(frozen=True)
class Protocol:
    """The resolved settings of one protocol (see the module docstring for each)."""

    name: str = "project"
    reference_prep: str = "raw"
    jpeg_quality: int | None = None  # None: scored as generated (lossless)
    subject_crop: str = "mask"
    timestep_dtype: str = "float32"
    condition_latents: str = "mode"
    image_resize: str = "project"
    time_grid: str = "diffusers"
    vision_norm_eps: float | None = None  # None: the vision config's own

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("model.timestep_dtype", self.timestep_dtype, TIMESTEP_DTYPES),
            ("model.condition_latents", self.condition_latents, CONDITION_LATENTS),
            ("model.image_resize", self.image_resize, IMAGE_RESIZES),
            ("model.sampler_time_grid", self.time_grid, TIME_GRIDS),
        ):
            if value not in choices:
                raise ValueError(f"{key}: {value!r}; choose one of {choices}")
        q = self.jpeg_quality
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100):
            raise ValueError(
                f"model.eval_metrics.jpeg_quality: {q!r}; an integer 1-100, or 0 / false for no JPEG round trip"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self) -> list[str]:
        """The options set explicitly to something other than the named protocol's value."""
        base = PROTOCOLS[self.name]
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)]


PROTOCOLS: dict[str, Protocol] = {
    "project": Protocol(),
    "authors": Protocol(
        name="authors",
        reference_prep="mask_file",
        jpeg_quality=75,
        subject_crop="mask_black",
        timestep_dtype="bfloat16",
        condition_latents="sample",
        image_resize="authors",
        time_grid="authors",
        vision_norm_eps=1e-5,
    ),
}


def resolve_protocol(name: str, **explicit: Any) -> Protocol:
    """The named protocol with every explicitly given option (not None) in place of its value.
    ``jpeg_quality`` 0 / false means no JPEG round trip."""
    if name not in PROTOCOLS:
        raise ValueError(f"model.protocol: unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    unknown = set(explicit) - {f.name for f in fields(Protocol)} - {"name"}
    if unknown:
        raise TypeError(f"resolve_protocol: unknown options {sorted(unknown)}")
    given = {k: v for k, v in explicit.items() if v is not None}
    if given.get("jpeg_quality") in (0, False):
        given["jpeg_quality"] = None
    return replace(PROTOCOLS[name], **given)
