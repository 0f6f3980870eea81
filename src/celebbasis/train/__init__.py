"""Personalization (paper §3.3, METHOD §4): learn the identity network on photos of each person.

One concern per module: ``checks`` (everything checked before any work), ``augment`` (the official
views: flip, colour jitter, the face shrunk and pasted on black), ``views`` (the pool of VAE-encoded
views with their face vectors), ``trainer`` (``Personalizer``: one run, step by step), ``record``
(``PersonalizeResult``: the identities written together, and the run record) and ``run``
(``personalize``, the call that does it all). The names below are the training layer's public API.
"""

from .checks import check_inputs, check_people, photo_groups
from .run import default_analyzer, default_config, personalize
from .record import PersonalizeResult
from .trainer import Personalizer

__all__ = ["PersonalizeResult", "Personalizer", "check_inputs", "check_people", "default_analyzer", "default_config",
           "personalize", "photo_groups"]
