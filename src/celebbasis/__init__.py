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

import sys
import types

from ._version import __version__

# Names of the public API -> the module that defines them. They are imported on first use (PEP 562), so
# that ``import celebbasis`` and the command line start in milliseconds: the CLI checks its inputs
# before torch and diffusers are imported.
_EXPORTS = {
    "CelebBasis": "basis", "build_basis": "basis", "cached_basis": "basis",
    "CelebBasisError": "errors", "FileFormatError": "errors", "InputError": "errors", "ModelLoadError": "errors",
    "NoFaceFoundError": "errors",
    "export_identity": "export", "import_embedding": "export",
    "FaceAnalyzer": "face", "FaceEncoder": "face", "load_image": "face",
    "GeneratedImage": "generate", "generate": "generate", "save_images": "generate",
    "Identity": "identity", "IdentityEncoder": "identity",
    "load_identity": "insert", "unload_identity": "insert",
    "PretrainedNetwork": "pretrain", "pretrain": "pretrain", "PretrainConfig": "config",
    "mix": "mix",
    "DEFAULT_MODEL": "models", "DEFAULT_SDXL_MODEL": "models", "load_pipeline": "models",
    "BasisConfig": "config", "GenerateConfig": "config", "TrainConfig": "config",
    "PersonalizeResult": "train", "personalize": "train",
}


def __getattr__(name: str):
    import importlib.util

    _plug_in()
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module: cb.toy (the toy world), cb.models, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def _plug_in() -> None:
    """The plug-ins register with the library's registries on the first use of the API (the toy world: its
    face network, training preset, packaged model and pretrained network)."""
    importlib = __import__("importlib")
    if "toy" not in globals():
        globals()["toy"] = importlib.import_module(f"{__name__}.toy")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``cb.generate`` and ``cb.mix`` the functions: importing a submodule binds its name on the package,
    and two submodules are named after the function they define."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    "PretrainConfig",
    "PretrainedNetwork",
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
    "pretrain",
    "save_images",
    "toy",
    "unload_identity",
]
