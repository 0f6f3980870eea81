"""celebbasis: put anyone into Stable Diffusion from one face photo.

Implements "Inserting Anybody in Diffusion Models via Celeb Basis" (Yuan et al., NeurIPS 2023,
arXiv 2306.00926): celebrity-name embeddings span a basis; a tiny network maps a face-recognition
vector to coefficients in it; the result is a new word that an unchanged SD model draws like a name.

Example:
    >>> import celebbasis as cb
    >>> pipe = cb.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> result = cb.personalize(pipe, ["alice.jpg"], ["alice"])
    >>> cb.save_images(cb.generate(pipe, "<alice> person and Barack Obama cooking"), "out/")
"""

from ._version import __version__

from .basis import CelebBasis, build_basis, cached_basis
from .errors import CelebBasisError, FileFormatError, InputError, ModelLoadError, NoFaceFoundError
from .export import export_identity, import_embedding
from .face import FaceAnalyzer, FaceEncoder, load_image
from .generate import GeneratedImage, generate, save_images
from .identity import Identity, IdentityEncoder
from .insert import load_identity, unload_identity
from .mix import mix
from .models import DEFAULT_MODEL, DEFAULT_SDXL_MODEL, load_pipeline
from .config import BasisConfig, GenerateConfig, TrainConfig
from .train import PersonalizeResult, personalize
from . import toy  # noqa: E402  the toy world plugs in here (cb.toy.score, cb.toy.world, load_pipeline(toy=True), ...)

__all__ = [
    "__version__",
    "BasisConfig",
    "CelebBasis",
    "CelebBasisError",
    "DEFAULT_MODEL",
    "DEFAULT_SDXL_MODEL",
    "FaceAnalyzer",
    "FaceEncoder",
    "FileFormatError",
    "GenerateConfig",
    "GeneratedImage",
    "Identity",
    "IdentityEncoder",
    "InputError",
    "ModelLoadError",
    "NoFaceFoundError",
    "PersonalizeResult",
    "TrainConfig",
    "build_basis",
    "cached_basis",
    "export_identity",
    "import_embedding",
    "mix",
    "generate",
    "load_identity",
    "load_image",
    "load_pipeline",
    "personalize",
    "save_images",
    "toy",
    "unload_identity",
]
