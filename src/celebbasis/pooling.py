"""SDXL's pooled prompt vector, read at the end-of-text token also when a prompt holds new words.

transformers' CLIP text model reads its pooled output at ``input_ids.argmax()`` when its config has
the legacy ``eos_token_id`` 2, as both of SDXL's text encoder configs do. That is the end-of-text
token only while it is the largest id in the prompt: the ids of added words lie above it, so in
diffusers a prompt with ``<alice>`` is pooled at ``<alice>_1``. ComfyUI (``comfy/sd1_clip.py`` and
``clip_model.py``: at the end token, counted by the attention mask, or the id remapped to be the
largest) and A1111/Forge (argmax over the prompt's ids, embedding slots written as id 0) read it at
the end token, which is also what the model was trained with. A forward hook on the text encoder
whose pooled vector conditions the UNet (``ModelFamily.pooled_encoder``: SDXL's second) gives
diffusers the same: for prompts with ids above the end-of-text id (and only those), ``text_embeds``
(``pooler_output`` for a ``CLIPTextModel``) is recomputed from the last hidden state at the first
end-of-text token. Training (``ModelFamily.conditioning``) and generation (``insert.load_identity``)
both use it, so an identity meets the same pooled vector everywhere.

Every function takes that encoder as a ``(tokenizer, text_encoder)`` pair, or ``None`` where a
family pools nothing (SD 1.x/2.x): then it does nothing. This module sits beside ``families`` and
imports nothing of the package.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_ATTRIBUTE = "_celebbasis_eos_pooling"  # the text encoder's hook, found again through it (deep copies too)


class _EosPooling:
    """The forward hook: pooled output at the first ``eos_id`` of every prompt that holds a new word.

    ``persistent``: installed by ``use_eos_pooling`` (until ``remove_eos_pooling``, or until the
    new words are unloaded from the text encoder); ``scopes``: ``eos_pooling`` blocks using it;
    ``handle``: torch's handle that removes it.
    """

    def __init__(self, eos_id: int):
        self.eos_id = eos_id
        self.persistent = False
        self.scopes = 0
        self.handle = None

    def __call__(self, module, args, kwargs, output):
        import torch  # here, not at the top: the command line imports the families (and this) before torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(ids) or ids.ndim != 2:
            return None
        at_eos = ids == self.eos_id
        rows = (ids > self.eos_id).any(-1) & at_eos.any(-1)  # prompts with new words (and an end token)
        if not bool(rows.any()):
            if self.persistent and not self.scopes and module.get_input_embeddings().num_embeddings <= self.eos_id + 1:
                _drop(module)  # the new words were unloaded (the table shrank back): nothing left to do
            return None
        projected = hasattr(module, "text_projection")  # CLIPTextModelWithProjection: text_embeds, else pooler_output
        as_tuple = isinstance(output, tuple)  # return_dict=False
        hidden = output[1 if projected else 0] if as_tuple else output.last_hidden_state
        pos = at_eos.int().argmax(-1).to(hidden.device)  # first end-of-text token of each prompt
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        if projected:
            pooled = module.text_projection(pooled)
        index, key = (0, "text_embeds") if projected else (1, "pooler_output")
        old = output[index] if as_tuple else output[key]
        new = torch.where(rows.to(old.device)[:, None], pooled.to(old.dtype), old)  # other prompts: the model's own
        if as_tuple:
            return output[:index] + (new,) + output[index + 1:]
        output[key] = new
        return output


def _needs_hook(encoder) -> bool:
    """Whether transformers would not pool this (tokenizer, text encoder) at the end token by itself."""
    tok, te = encoder or (None, None)
    if te is None or tok is None or tok.eos_token_id is None:
        return False
    return getattr(te.config, "eos_token_id", None) != tok.eos_token_id  # newer configs: already the first end token


def _drop(module) -> None:
    hook = getattr(module, _ATTRIBUTE, None)
    if hook is not None:
        hook.handle.remove()
        delattr(module, _ATTRIBUTE)


def _added(encoder) -> _EosPooling | None:
    """The text encoder's hook, added if it was not there yet; ``None`` where nothing is needed."""
    if not _needs_hook(encoder):
        return None
    tok, te = encoder
    hook = getattr(te, _ATTRIBUTE, None)
    if hook is None:
        hook = _EosPooling(int(tok.eos_token_id))
        hook.handle = te.register_forward_hook(hook, with_kwargs=True)
        setattr(te, _ATTRIBUTE, hook)
    return hook


def use_eos_pooling(encoder) -> bool:
    """Read the pooled prompt vector of ``encoder`` at the end-of-text token from now on, also for new words.

    ``insert.load_identity`` calls this. Prompts without new words give exactly what they gave before.
    Undone by ``remove_eos_pooling``, and by itself once the new words are gone from the text encoder
    (``pipe.unload_textual_inversion``). Returns whether the encoder needed it (SDXL with a legacy config).
    """
    hook = _added(encoder)
    if hook is not None:
        hook.persistent = True
    return hook is not None


def remove_eos_pooling(encoder) -> None:
    """Undo ``use_eos_pooling``: the text encoder pools as transformers does (after any ``eos_pooling`` block)."""
    hook = getattr(encoder[1], _ATTRIBUTE, None) if encoder is not None else None
    if hook is not None:
        hook.persistent = False
        if not hook.scopes:
            _drop(encoder[1])


@contextmanager
def eos_pooling(encoder) -> Iterator[None]:
    """Inside the block, ``encoder``'s pooled prompt vector is read at the end-of-text token (``use_eos_pooling``).

    Training conditions on this; on leaving, the encoder pools as it did before the block.
    """
    hook = _added(encoder)
    if hook is None:
        yield
        return
    hook.scopes += 1
    try:
        yield
    finally:
        hook.scopes -= 1
        if not hook.scopes and not hook.persistent:
            _drop(encoder[1])
