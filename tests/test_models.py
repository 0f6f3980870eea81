"""Loading models through the library leaves the caller's process as it found it."""

from __future__ import annotations

import logging
import sys
import warnings

LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate")


def test_loading_a_pipeline_changes_no_process_wide_warning_or_logging_state(tiny_model_dir, monkeypatch):
    """Warning filters and other libraries' logger levels are the process's, not the library's (and not thread-safe).

    Besides comparing the state before and after, every call that would change it is watched while
    ``load_pipeline`` runs: ``catch_warnings`` restores the filters afterwards, yet changes them for
    every thread meanwhile. Calls from diffusers' or transformers' own code are theirs and not counted.
    """
    from celebbasis.models import load_pipeline

    touched = []

    def watch(owner, name):
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("celebbasis") and not (name == "setLevel" and args[0].name.startswith("celebbasis")):
                touched.append(f"{caller}: {name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    for name in ("catch_warnings", "filterwarnings", "simplefilter", "resetwarnings"):
        watch(warnings, name)
    watch(logging.Logger, "setLevel")
    filters = list(warnings.filters)
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")

    assert pipe.unet is not None
    assert touched == []
    assert warnings.filters == filters
    assert {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS} == levels


def test_the_library_source_never_quiets_the_process():
    """The quieting that ``models.py`` used to do lives in the CLI's ``main`` now, for its own run."""
    from pathlib import Path

    import celebbasis

    for path in sorted(Path(celebbasis.__file__).parent.rglob("*.py")):
        if path.name == "cli.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("warnings.catch_warnings", "warnings.filterwarnings", "warnings.simplefilter", "set_verbosity"):
            assert needle not in text, f"{path.name}: {needle}"
