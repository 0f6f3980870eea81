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

__version__ = "0.1.0"

from .basis import CelebBasis, build_basis, cached_basis  # noqa: E402
from .errors import CelebBasisError, FileFormatError, InputError, ModelLoadError, NoFaceFoundError  # noqa: E402
from .export import export_identity, import_embedding  # noqa: E402
from .face import FaceAnalyzer, FaceEncoder, load_image  # noqa: E402
from .generate import GeneratedImage, generate, save_images  # noqa: E402
from .identity import Identity, IdentityEncoder  # noqa: E402
from .insert import load_identity  # noqa: E402
from .mix import mix  # noqa: E402
from .models import DEFAULT_MODEL, DEFAULT_SDXL_MODEL, load_pipeline  # noqa: E402
from .train import PersonalizeResult, TrainConfig, personalize  # noqa: E402

__all__ = [
    "__version__",
    "CelebBasis",
    "CelebBasisError",
    "DEFAULT_MODEL",
    "DEFAULT_SDXL_MODEL",
    "FaceAnalyzer",
    "FaceEncoder",
    "FileFormatError",
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
]
