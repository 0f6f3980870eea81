"""Model families: everything SD 1.x, SD 2.x and SDXL differ in, one definition each.

A ``ModelFamily`` (the strategy objects of sd-scripts' ``library/strategy_*.py`` are the model) owns:

- its diffusers pipeline class and default hub model (also the configuration its single files load with);
- how a folder (``model_index.json``'s class) and a single-file checkpoint (its keys) are recognised;
- its text encoders, as (tokenizer, text encoder) pipeline attributes in order: ``encoders(pipe)``.
  Encoder ``i`` is the identity's part ``i`` (``Identity.parts``; in its file the tensors
  ``coefficients``/``embeddings`` with suffix ``slot_suffix(i)``: ``""``, ``"_2"``, ...), and the basis
  file ``NAME.safetensors``, ``NAME_2.safetensors``; the first tokenizer checks prompts (``tokenizer``);
- the keys of its textual-inversion exports when it has several encoders (SDXL: ``clip_l``, ``clip_g``);
- how captions become the UNet's conditioning (``conditioning``: SDXL adds the pooled vector and time ids),
  and which encoder's pooled vector that uses (``pooled_encoder``);
- its native image size (``native_size``), its ``modelspec.architecture``, and the name of its tiny
  random test model (built by ``celebbasis.testing``, which this module does not import).

The rest of the package iterates over ``family_of(pipe).encoders(pipe)`` and never asks which family
it is. To add a family, subclass ``ModelFamily`` and ``register`` an instance (and, for ``tiny=True``, its
tiny model with ``testing.register_tiny_pipeline``): ``tests/test_families.py`` defines and trains one in
the test file alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, ModelLoadError
from .pooling import eos_pooling

TINY_MODEL = "tiny"  # the in-process tiny random model's name, recorded in what it makes (``tiny-sdxl``, ...)
FAMILY_METADATA_KEY = "model_family"  # identity metadata naming the family it was made for (older files lack it)


def slot_suffix(i: int) -> str:
    """What the tensors and files of text encoder ``i`` (0-based, in slot order) are suffixed with: ``""``, ``"_2"``, ..."""
    return "" if i == 0 else f"_{i + 1}"


@dataclass(frozen=True)
class ModelFamily:
    """One model family. Subclass it and override the methods where a new family differs.

    Attributes:
        name: registry key, e.g. ``"sd1"``; the tiny model of the family is called ``tiny-NAME`` (``tiny`` for sd1).
        title: how messages name it, e.g. ``"SD 1.x"``.
        pipeline_class: the diffusers pipeline class (``_class_name`` in ``model_index.json``).
        default_model: hub id loaded when no model is given, and whose configuration single files load with.
        encoder_attributes: (tokenizer, text encoder) attribute names of the pipeline, in slot order.
        export_keys: textual-inversion export keys, one per encoder, for a family with several encoders;
            empty: the one-encoder layouts (``{"<token>": ...}`` / ``{"emb_params": ...}``).
        single_file_encoders: (key prefix, layout) of each text encoder in an original-layout single file
            (A1111, ComfyUI), in slot order; layout ``"clip"`` (OpenAI CLIP, transformers' names) or
            ``"open_clip"`` (OpenCLIP's ``resblocks``). The first encoder's token table names the family and
            its width is checked against the configuration. Empty: no single files.
        native_width: the real model's (first) text encoder width: tells one-encoder identities apart.
        architecture: ``modelspec.architecture`` of its embeddings (before ``/textual-inversion``).
        built_in: older identities of built-in families, which record no family, are told
            apart by their slots and width; every identity now records its family (``FAMILY_METADATA_KEY``).
    """

    name: str
    title: str
    pipeline_class: str
    default_model: str
    encoder_attributes: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    export_keys: tuple[str, ...] = ()
    single_file_encoders: tuple[tuple[str, str], ...] = ()
    native_width: int | None = None
    architecture: str = "stable-diffusion"
    built_in: bool = False

    # -- recognising a model ------------------------------------------------------------------------
    def matches(self, pipe) -> bool:
        """Whether ``pipe`` is a pipeline of this family (its class, or a subclass, and all its encoders)."""
        classes = {c.__name__ for c in type(pipe).__mro__}
        return self.pipeline_class in classes and all(
            getattr(pipe, tok, None) is not None and getattr(pipe, te, None) is not None for tok, te in self.encoder_attributes)

    @property
    def token_table_key(self) -> str | None:
        """Original-layout key of the first text encoder's token table, or ``None`` without single files."""
        if not self.single_file_encoders:
            return None
        prefix, layout = self.single_file_encoders[0]
        return prefix + ("token_embedding.weight" if layout == "open_clip" else "text_model.embeddings.token_embedding.weight")

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether a single-file checkpoint with these ``{key: shape}`` is of this family: the first encoder's
        token table and every other encoder's weights are there."""
        return self.token_table_key is not None and self.token_table_key in shapes and all(
            any(k.startswith(prefix) for k in shapes) for prefix, _ in self.single_file_encoders[1:])

    def single_file_width(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The width of the first text encoder of a single file this family recognises."""
        return shapes[self.token_table_key][1]

    def pipeline_type(self):
        """The diffusers pipeline class itself (imported on first use)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    # -- text encoders and conditioning ----------------------------------------------------------------
    def encoders(self, pipe) -> list[tuple]:
        """(tokenizer, text_encoder) pairs of ``pipe``, in slot order."""
        return [(getattr(pipe, tok), getattr(pipe, te)) for tok, te in self.encoder_attributes]

    def tokenizer_attributes(self) -> list[str]:
        return [tok for tok, _ in self.encoder_attributes]

    def tokenizer(self, pipe):
        """The first encoder's tokenizer: the one prompts are checked and expanded with."""
        return getattr(pipe, self.encoder_attributes[0][0])

    def pooled_encoder(self, pipe):
        """(tokenizer, text encoder) whose pooled output conditions the UNet, or ``None``."""
        return None

    def conditioning(self, pipe, captions: list[str], size: int) -> tuple:
        """The UNet conditioning of ``captions`` at ``size``² pixels, as the pipeline's own code computes it.

        Returns (B, T, D) hidden states and the UNet's ``added_cond_kwargs`` (``{}`` when none). Calls
        ``pipe.encode_prompt`` without classifier-free guidance and without ``no_grad``, so gradients
        reach the word embeddings.
        """
        device = self.encoders(pipe)[0][1].device
        embeds, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return embeds, {}

    def native_size(self, pipe) -> int:
        """The model's native image size in pixels: what training and generation use when no size is set."""
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    # -- identities and exports -------------------------------------------------------------------------
    def identity_metadata(self) -> dict[str, str]:
        """What an identity made on this family records to name it."""
        return {FAMILY_METADATA_KEY: self.name}

    def modelspec_architecture(self, width: int) -> str:
        """``modelspec.architecture`` of an embedding whose (first) vectors are ``width`` wide."""
        return self.architecture

    # -- the tiny random model ---------------------------------------------------------------------------
    @property
    def tiny_name(self) -> str:
        """``_name_or_path`` of the in-process tiny model, recorded as the base model of what it makes."""
        return TINY_MODEL if self.name == "sd1" else f"{TINY_MODEL}-{self.name}"


@dataclass(frozen=True)
class OneEncoderFamily(ModelFamily):
    """SD 1.x and SD 2.x: one CLIP text encoder, conditioning its last hidden state."""

    pad_token: str | None = None  # the tokenizer's padding token when it tells this family apart (SD 2.x: "!")

    def matches(self, pipe) -> bool:
        return super().matches(pipe) and (self.pad_token is None or getattr(pipe.tokenizer, "pad_token", None) == self.pad_token)

    def modelspec_architecture(self, width: int) -> str:
        return self.architecture if width == self.native_width else "stable-diffusion"


@dataclass(frozen=True)
class XLFamily(ModelFamily):
    """SDXL: CLIP-L and OpenCLIP-G, both penultimate layers; the second's pooled vector and the time ids as added conditions."""

    def pooled_encoder(self, pipe):
        tok, te = self.encoder_attributes[-1]
        return getattr(pipe, tok, None), getattr(pipe, te, None)

    def conditioning(self, pipe, captions, size):
        """``pipe.encode_prompt``, its pooled vector read at the end-of-text token (``pooling.eos_pooling``), and
        the time ids ``pipe.__call__`` adds for a ``size``² image, uncropped: (original, crop corner, target)."""
        import torch

        device = self.encoders(pipe)[0][1].device
        with eos_pooling(self.pooled_encoder(pipe)):
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=pooled.device)  # (1, 6)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}


SD1 = OneEncoderFamily(
    name="sd1", title="SD 1.x", pipeline_class="StableDiffusionPipeline",
    default_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    single_file_encoders=(("cond_stage_model.transformer.", "clip"),),
    native_width=768, architecture="stable-diffusion-v1", built_in=True)
# SD 2.x means the 768 px v-prediction model; 512 px SD 2.x-base single files need
# --model-config stabilityai/stable-diffusion-2-1-base.
SD2 = OneEncoderFamily(
    name="sd2", title="SD 2.x", pipeline_class="StableDiffusionPipeline", default_model="stabilityai/stable-diffusion-2-1",
    single_file_encoders=(("cond_stage_model.model.", "open_clip"),), native_width=1024,
    architecture="stable-diffusion-v2-768-v", built_in=True, pad_token="!")
SDXL = XLFamily(
    name="sdxl", title="SDXL", pipeline_class="StableDiffusionXLPipeline",
    default_model="stabilityai/stable-diffusion-xl-base-1.0",
    encoder_attributes=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    export_keys=("clip_l", "clip_g"),
    single_file_encoders=(("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")),
    native_width=768, architecture="stable-diffusion-xl-v1-base", built_in=True)

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add (or replace) a family. Families registered later are asked first by ``family_of``."""
    FAMILIES.pop(family.name, None)
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family added with ``register`` (tests)."""
    FAMILIES.pop(name, None)


for _family in (SD1, SD2, SDXL):
    register(_family)


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise InputError(f"Unknown model family {name!r}. Known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of_tiny(name: str) -> ModelFamily | None:
    """The family whose tiny model is called ``name`` (``"tiny"``, ``"tiny-sd2"``, ...), or ``None``."""
    return next((f for f in FAMILIES.values() if f.tiny_name == name), None)


def family_of(pipe) -> ModelFamily:
    """The family of a pipeline: the last registered one that ``matches`` it.

    Raises:
        ModelLoadError: no family matches (another kind of diffusers pipeline).
    """
    for family in reversed(list(FAMILIES.values())):
        if family.matches(pipe):
            return family
    raise ModelLoadError(f"{type(pipe).__name__} is not a pipeline of a supported model family "
                         f"({', '.join(f.title for f in FAMILIES.values())}).")


def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, text_encoder) pairs of a pipeline, in its family's order: one for SD 1.x/2.x, two for SDXL."""
    return family_of(pipe).encoders(pipe)


def supported_pipelines() -> list[str]:
    """The pipeline classes of every family, as ``model_index.json`` names them."""
    return list(dict.fromkeys(f.pipeline_class for f in FAMILIES.values()))


def checkpoint_family_of(shapes: dict[str, tuple[int, ...]]) -> ModelFamily | None:
    """The family that recognises a single file's ``{key: shape}``, or ``None``."""
    return next((f for f in reversed(list(FAMILIES.values())) if f.recognises(shapes)), None)


def identity_family(metadata: dict, n_encoders: int, width: int) -> ModelFamily:
    """The family an identity (or an export) was made for, from its metadata, encoder count and first width.

    The metadata names it (``FAMILY_METADATA_KEY``). Older files that do not, made for a
    built-in family, are told apart by the number of encoders and, for one encoder, the width (SD 2.x
    is 1024 wide; a width of no real model reads as SD 1.x, which behaves the same).

    Raises:
        InputError: the metadata names a family that is not registered in this process.
    """
    name = metadata.get(FAMILY_METADATA_KEY)
    if name:
        if name not in FAMILIES:
            raise InputError(f"This identity was made for the model family {name!r}, which is not registered here "
                             f"(known: {', '.join(FAMILIES)}). Register it (celebbasis.families.register) first.")
        return FAMILIES[name]
    candidates = [f for f in FAMILIES.values() if f.built_in and len(f.encoder_attributes) == n_encoders]
    if not candidates:
        raise InputError(f"No model family has {n_encoders} text encoders.")
    return next((f for f in candidates if f.native_width == width), candidates[0])


def export_families() -> list[ModelFamily]:
    """Families with several encoders, whose exports use one key per encoder (``read_embedding_file``)."""
    return [f for f in FAMILIES.values() if f.export_keys]
