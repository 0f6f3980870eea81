"""Everything ``personalize`` checks before any work: people, names, photos, the pipeline."""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from ..families import text_encoders
from ..identity import check_name
from ..insert import check_token_free


def photo_groups(photos) -> list[list]:
    """Per person, a list of photos: each item of ``photos`` is one photo or a list/tuple of photos."""
    groups = [list(p) if isinstance(p, (list, tuple)) else [p] for p in photos]
    for i, g in enumerate(groups):
        if not g:
            raise InputError(f"Person {i + 1} has an empty list of photos. Give at least one photo per person.")
    return groups


def check_people(names: list[str], n_people: int) -> list[str]:
    """Names valid, distinct and one per person; needs no model, so front ends call it before reading photos."""
    if n_people == 0:
        raise InputError("No photo given. Pass one face photo (or a list of photos) per person.", field="photos")
    if len(names) != n_people:
        raise InputError(f"{n_people} photo(s) but {len(names)} name(s). Give one name per person "
                         "(or per list of photos of one person), in the same order.", field="names")
    names = [check_name(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"The name(s) {', '.join(dup)} appear more than once. Give each person their own name.",
                         field="names")
    return names


def check_inputs(pipe, names: list[str], n_people: int) -> list[str]:
    """Everything about the call that training checks, before any work: the people (``check_people``),
    names that are not words of the model's tokenizers (``check_token_free``), a pipeline without offload hooks.

    ``personalize`` calls it once; ``Personalizer`` trusts what it let through."""
    names = check_people(names, n_people)
    for tokenizer, _ in text_encoders(pipe):
        for n in names:
            check_token_free(tokenizer, f"<{n}>")
    check_not_offloaded(pipe)
    return names


def check_not_offloaded(pipe) -> None:
    """Refuse pipelines with accelerate offload hooks: training needs every module to stay on its device."""
    modules = [getattr(pipe, "unet", None), getattr(pipe, "vae", None)] + [te for _, te in text_encoders(pipe)]
    hooked = bool(getattr(pipe, "_all_hooks", None)) or any(
        hasattr(sub, "_hf_hook") for m in modules if isinstance(m, nn.Module) for sub in m.modules())
    if hooked:
        raise InputError("This pipeline uses CPU offload (enable_model_cpu_offload/enable_sequential_cpu_offload); "
                         "personalize on a pipeline moved to one device with pipe.to(device), then enable offload.")

