"""Exports load through diffusers' own loaders; imports and mixes behave as documented."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shlex
import stat
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from celebbasis.basis import build_basis
from celebbasis.cli import main
from celebbasis.errors import InputError
from celebbasis.export import export_identity, import_embedding
from celebbasis.families import family_of, text_encoders
from celebbasis.identity import Identity, IdentityPart
from celebbasis.insert import load_identity
from celebbasis.mix import celebrity_coefficients, mix
from celebbasis.pooling import eos_pooling
from celebbasis.testing import save_tiny_pipeline, tiny_pipeline

FAST = ["--steps", "2", "--resolution", "64", "-q"]


def random_identity(pipe, name="alice", seed=1, n_components=512):
    g = torch.Generator().manual_seed(seed)
    bases = [build_basis(tok, te, n_components=n_components) for tok, te in text_encoders(pipe)]
    coeffs = [F.normalize(torch.randn(2, b.n_components, generator=g), dim=-1) for b in bases]
    return Identity.from_coefficients(f"<{name}>", coeffs, bases, base_model="tiny"), bases


def embeds(pipe, prompt):
    out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0], (out[2] if len(out) > 2 else None)  # prompt embeds, pooled (SDXL)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipeline(family="sdxl")


PROMPT = "a photo of <alice> person and Barack Obama"


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "comfyui"])
def test_sd1_export_loads_in_diffusers(tmp_path, sd1, fmt):
    ident, _ = random_identity(sd1)
    ours, theirs = copy.deepcopy(sd1), copy.deepcopy(sd1)
    load_identity(ours, ident)
    path = export_identity(ident, fmt, tmp_path)
    assert path.name == "alice.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys == (["<alice>"] if fmt == "diffusers" else ["emb_params"])
    assert meta["format"] == "pt" and meta["modelspec.title"] == "alice" and meta["base_model"] == "tiny"
    assert meta["modelspec.architecture"].endswith("/textual-inversion") and "modelspec.date" in meta
    if fmt == "diffusers":
        theirs.load_textual_inversion(str(path))  # no arguments needed
    else:
        theirs.load_textual_inversion(str(path), token="<alice>")
    assert torch.allclose(embeds(ours, PROMPT)[0], embeds(theirs, PROMPT)[0], atol=1e-5)


def test_a1111_pt_loads_weights_only(tmp_path, sd1):
    ident, _ = random_identity(sd1)
    path = export_identity(ident, "a1111", tmp_path, pt=True)
    assert path.name == "alice.pt"
    data = torch.load(path, weights_only=True)
    assert data["name"] == "alice" and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], ident.embeddings)
    theirs, ours = copy.deepcopy(sd1), copy.deepcopy(sd1)
    theirs.load_textual_inversion(data, token="<alice>")
    load_identity(ours, ident)
    assert torch.allclose(embeds(ours, PROMPT)[0], embeds(theirs, PROMPT)[0], atol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_sdxl_export_loads_per_encoder(tmp_path, sdxl, fmt):
    from safetensors.torch import load_file

    ident, _ = random_identity(sdxl)
    ours, theirs = copy.deepcopy(sdxl), copy.deepcopy(sdxl)
    load_identity(ours, ident)
    path = export_identity(ident, fmt, tmp_path)
    state = load_file(path)
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape == (2, 32) and state["clip_g"].shape == (2, 64)
    theirs.load_textual_inversion(state["clip_l"], token="<alice>", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="<alice>", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    with eos_pooling(family_of(theirs).pooled_encoder(theirs)):  # as ComfyUI and A1111/Forge pool SDXL prompts (diffusers alone pools at argmax)
        (a, pa), (b, pb) = embeds(ours, PROMPT), embeds(theirs, PROMPT)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(pa, pb, atol=1e-5)
    plain, _ = embeds(copy.deepcopy(sdxl), "a photo of person and Barack Obama")
    assert not torch.allclose(a[:, :6], plain[:, :6], atol=1e-3)


def test_import_round_trip_and_residual(tmp_path, sd1):
    ident, bases = random_identity(sd1, n_components=8)  # a basis narrower than the width: residuals exist
    path = export_identity(ident, "a1111", tmp_path, pt=True)
    back, residual = import_embedding(path, "alice2", bases)
    assert residual[0] < 1e-5
    assert torch.allclose(back.coefficients, ident.coefficients, atol=1e-5)
    assert torch.allclose(back.embeddings, ident.embeddings, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    outside = {"<x>": torch.randn(3, 32, generator=g) * 0.5}  # 3 vectors, in no basis
    from safetensors.torch import save_file

    save_file(outside, tmp_path / "x.safetensors")
    other, residual = import_embedding(tmp_path / "x.safetensors", "x", bases)
    assert 0.3 < residual[0] < 1.0
    assert other.n_tokens == 3 and other.coefficients.shape == (3, 8)
    # the projection is least squares: the residual is orthogonal to the basis directions
    for i, slot in enumerate([0, 1, 1]):
        r = outside["<x>"][i] - other.embeddings[i]
        assert torch.allclose(bases[0].components[slot] @ r, torch.zeros(8), atol=1e-5)


def test_mix_weights_and_renormalises(sd1):
    alice, bases = random_identity(sd1, "alice", 1)
    bob, _ = random_identity(sd1, "bob", 2)
    mixed = mix([(alice, 0.5), (bob, 0.5)], "alibob", bases)
    expect = F.normalize(alice.coefficients + bob.coefficients, dim=-1)
    assert torch.allclose(mixed.coefficients, expect, atol=1e-6)
    assert torch.allclose(mixed.embeddings, bases[0].reconstruct(expect), atol=1e-6)
    assert torch.allclose(mix([(alice, 1.0), (bob, 0.0)], "a2", bases).coefficients, alice.coefficients, atol=1e-6)
    with_name = mix([(alice, 0.7), ("Anne Hathaway", 0.3)], "alianne", bases, sd1)
    anne = F.normalize(celebrity_coefficients("Anne Hathaway", sd1.tokenizer, sd1.text_encoder, bases[0]), dim=-1)
    assert torch.allclose(with_name.coefficients, F.normalize(0.7 * alice.coefficients + 0.3 * anne, dim=-1), atol=1e-6)
    for bad in (float("nan"), float("inf"), 1e308):  # never a NaN identity
        with pytest.raises(InputError, match="finite numbers"):
            mix([(alice, bad), (bob, 0.5)], "bad", bases)
    # a name's coefficients reproduce its token embeddings when the basis spans the width
    ids = sd1.tokenizer("Anne Hathaway", add_special_tokens=False).input_ids
    table = sd1.text_encoder.get_input_embeddings().weight.detach()
    assert torch.allclose(bases[0].reconstruct(celebrity_coefficients("Anne Hathaway", sd1.tokenizer, sd1.text_encoder, bases[0])),
                          table[ids], atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_add_export_generate_every_family(tmp_path, astronaut_path, family):
    from diffusers import DiffusionPipeline

    model = save_tiny_pipeline(tmp_path / f"tiny-{family}", family=family)
    ids, out = tmp_path / "ids", tmp_path / "out"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(model), "-o", str(ids), *FAST]) == 0
    ident = Identity.load(ids / "alice.safetensors")
    assert len(ident.parts) == (2 if family == "sdxl" else 1)
    run = json.loads((ids / "alice.run.json").read_text())
    assert len(run["losses"]) == 2
    assert main(["export", str(ids / "alice.safetensors"), "--format", "diffusers", "-o", str(tmp_path / "ti"), "-q"]) == 0
    pipe = DiffusionPipeline.from_pretrained(model)
    if family == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token == "!"
    if family == "sdxl":
        from safetensors.torch import load_file

        state = load_file(tmp_path / "ti" / "alice.safetensors")
        pipe.load_textual_inversion(state["clip_l"], token="<alice>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="<alice>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(str(tmp_path / "ti" / "alice.safetensors"))
    image = pipe("<alice> person", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert main(["generate", "<alice> person at the beach", "--identity", str(ids / "alice.safetensors"), "--model", str(model),
                 "-o", str(out), "--steps", "2", "-q"]) == 0
    assert Image.open(next(out.glob("*.png"))).text["identities"] == '["<alice>"]'


def test_cli_import_and_mix(tmp_path, tiny_model_dir, astronaut_path, capsys):
    ids = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(ids), *FAST]) == 0
    assert main(["export", str(ids / "alice.safetensors"), "--format", "a1111", "--pt", "-o", str(tmp_path / "emb"), "-q"]) == 0
    assert main(["import-embedding", str(tmp_path / "emb" / "alice.pt"), "--name", "alice_back", "--model", str(tiny_model_dir),
                 "-o", str(ids)]) == 0
    assert "relative residual of the projection: 0.000" in capsys.readouterr().err
    back = Identity.load(ids / "alice_back.safetensors")
    assert torch.allclose(back.embeddings, Identity.load(ids / "alice.safetensors").embeddings, atol=1e-5)
    assert main(["mix", str(ids / "alice.safetensors"), "--celebrity", "Anne Hathaway", "--weights", "0.7", "0.3",
                 "--name", "alianne", "--model", str(tiny_model_dir), "-o", str(ids), "-q"]) == 0
    mixed = Identity.load(ids / "alianne.safetensors")
    assert torch.allclose(mixed.coefficients.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert main(["mix", str(ids / "alice.safetensors"), "--weights", "0.5", "0.5", "--name", "x", "--tiny", "-o", str(ids), "-q"]) == 2
    assert main(["export", str(ids / "alice.safetensors"), "--format", "diffusers", "--pt", "-o", str(tmp_path / "e2"), "-q"]) == 2


def test_file_name_must_match_the_layout(tmp_path, sd1):
    from celebbasis.errors import InputError

    ident, _ = random_identity(sd1)
    with pytest.raises(InputError, match="needs a .safetensors file name"):
        export_identity(ident, "a1111", tmp_path / "alice.pt")
    with pytest.raises(InputError, match="needs a .pt file name"):
        export_identity(ident, "a1111", tmp_path / "alice.safetensors", pt=True)
    assert export_identity(ident, "a1111", tmp_path / "Alice_Doe.safetensors").name == "Alice_Doe.safetensors"
    assert not list(tmp_path.glob("alice*"))


# --- AUTOMATIC1111's safe loader, re-implemented from its rules (modules/safe.py: check_pt) ---------------------
# A zip may hold only DIR/data.pkl, DIR/version and DIR/data/<n>; a non-zip file is legacy torch: five pickles
# (magic number, protocol, system info, the object, storage keys), each unpickled with this allow-list of globals.
A1111_ZIP_ENTRY = re.compile(r"^[^/]+/(data\.pkl|version|data/\d+)$")
A1111_DATA_PKL = re.compile(r"^[^/]+/data\.pkl$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                             "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("_codecs", "encode"), ("__builtin__", "set"),
}  # (A1111 also admits two pytorch_lightning checkpoint classes, irrelevant to embeddings)


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)  # an empty storage: only the pickle's globals are checked


def a1111_check(path):
    """Raise where A1111 would print "Error verifying pickled file" and skip the embedding."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                bad = [n for n in names if not A1111_ZIP_ENTRY.match(n)]
                if bad:
                    raise ValueError(f"bad file inside {path}: {bad[0]}")
                pkls = [n for n in names if A1111_DATA_PKL.match(n)]
                if len(pkls) != 1:
                    raise ValueError(f"{len(pkls)} data.pkl in {path}")
                with z.open(pkls[0]) as fh:
                    A1111Unpickler(fh).load()
        except zipfile.BadZipFile:
            with open(path, "rb") as fh:
                unpickler = A1111Unpickler(fh)
                for _ in range(5):
                    unpickler.load()


def test_a1111_pt_passes_a1111_safe_loader(tmp_path, sd1):
    ident, _ = random_identity(sd1)
    path = export_identity(ident, "a1111", tmp_path, pt=True)
    a1111_check(path)
    data = torch.load(path, weights_only=True)
    # what A1111's embedding loader reads: one string_to_param entry, named by the file, plus step and checkpoint name
    (vec,) = data["string_to_param"].values()
    assert torch.equal(vec, ident.embeddings) and vec.shape == (2, 32)
    assert data["name"] == "alice" and isinstance(data["step"], int) and data["sd_checkpoint_name"] == "tiny"
    # the rule has teeth: current torch's default zip archive fails it, and so does a global off the allow-list
    torch.save(data, tmp_path / "zip.pt")
    with pytest.raises(ValueError, match=r"bad file inside .*(\.format_version|byteorder|\.storage_alignment)"):
        a1111_check(tmp_path / "zip.pt")
    torch.save({"f": os.getcwd}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        a1111_check(tmp_path / "evil.pt")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_written_files_get_the_users_mode(tmp_path, sd1, umask, mode):
    from celebbasis.files import atomic_write
    from celebbasis.single_file import save_single_file

    ident, _ = random_identity(sd1)
    before = os.umask(umask)
    try:
        paths = [ident.save(tmp_path / "ids" / "alice.safetensors"),
                 export_identity(ident, "diffusers", tmp_path / "d"),
                 export_identity(ident, "a1111", tmp_path / "p", pt=True),
                 atomic_write(tmp_path / "notes.txt", lambda t: Path(t).write_text("x")),
                 save_single_file(sd1, tmp_path / "m" / "model.safetensors")]
        ident.save(tmp_path / "ids" / "alice.safetensors")  # replacing a file gives the same mode
        assert os.umask(umask) == umask  # the library left the umask as it found it
    finally:
        os.umask(before)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {oct(mode)}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def readme_section(title):
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_export_commands_run_in_order(tmp_path, sd1, monkeypatch, capsys):
    from safetensors.torch import load_file

    section = readme_section("Use an identity in other tools")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert len(commands) == 4 and all(c[:2] == ["celebbasis", "export"] for c in commands)
    monkeypatch.chdir(tmp_path)
    ident, _ = random_identity(sd1)
    ident.save("identities/alice.safetensors")  # a fresh identity where the README's commands expect it
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "exports").rglob("*") if p.is_file())
    assert len(written) == 4
    # every export file the per-tool paragraphs name is one the commands wrote, in the layout its tool reads
    named = set(re.findall(r"exports/[\w/.-]+\.(?:safetensors|pt)", section.split("**diffusers**", 1)[1]))
    assert named == set(written)
    diffusers_part = section.split("**diffusers**", 1)[1].split("**AUTOMATIC1111", 1)[0]
    for p in set(re.findall(r"exports/[\w/.-]+\.safetensors", diffusers_part)):
        assert list(load_file(p)) == ["<alice>"]
    for tool in ("**AUTOMATIC1111", "**ComfyUI"):
        part = section.split(tool, 1)[1].split("\n\n", 1)[0]
        for p in re.findall(r"exports/[\w/.-]+\.(?:safetensors|pt)", part):
            if p.endswith(".pt"):
                a1111_check(p)
                assert "string_to_param" in torch.load(p, weights_only=True)
            else:
                assert list(load_file(p)) == ["emb_params"]
    assert main(commands[0][1:] + ["-q"]) == 2  # run again: the file is there
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert main(commands[0][1:] + ["--overwrite", "-q"]) == 0
    before = Path("identities/alice.safetensors").read_bytes()  # never written over its own input
    assert main(["export", "identities/alice.safetensors", "--format", "a1111", "-o", "identities/", "--overwrite", "-q"]) == 2
    assert "is the identity being exported" in capsys.readouterr().err
    assert Path("identities/alice.safetensors").read_bytes() == before


def load_file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_export_output_paths_that_do_not_exist_yet(tmp_path, sd1):
    ident, _ = random_identity(sd1)
    ident.save(tmp_path / "alice.safetensors")
    src = str(tmp_path / "alice.safetensors")
    assert main(["export", src, "--format", "a1111", "-o", str(tmp_path / "some/new/file.safetensors"), "-q"]) == 0
    assert load_file_keys(tmp_path / "some/new/file.safetensors") == ["emb_params"]
    assert main(["export", src, "--format", "a1111", "--pt", "-o", str(tmp_path / "some/new/folder") + "/", "-q"]) == 0
    assert (tmp_path / "some/new/folder/alice.pt").is_file()
    assert main(["export", src, "-o", str(tmp_path / "other/new.pt"), "-q"]) == 2  # a suffix that does not match
    assert not (tmp_path / "other").exists()
    # through Python, a string ending in "/" is a folder even when its name has a dot
    assert export_identity(ident, "diffusers", str(tmp_path / "sd-v1.5") + "/") == tmp_path / "sd-v1.5" / "alice.safetensors"


def test_readme_identity_size_is_true(tmp_path):
    """SD 1.5: 2×512 coefficients + 2×768 embeddings; SDXL adds 2×512 + 2×1280; float32, with add's metadata."""
    claim = re.search(r"an identity file is ~(\d+) KB(?: \(SDXL: ~(\d+) KB\))?", (Path(__file__).parents[1] / "README.md").read_text())
    assert claim, "the README's identity size sentence changed; update this test"
    meta = {"basis_sha256": "a" * 64, "created": "2025-01-01T00:00:00+00:00", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "face_encoder": "dlib", "steps": 400, "seed": 0, "text_encoder_sha256": "b" * 64, "source_photo": "alice.jpg"}
    sd15 = Identity("<alice>", [IdentityPart(torch.randn(2, 512), torch.randn(2, 768))], meta).save(tmp_path / "sd15.safetensors")
    xl = Identity("<alice>", [IdentityPart(torch.randn(2, 512), torch.randn(2, 768)), IdentityPart(torch.randn(2, 512), torch.randn(2, 1280))],
                  {**meta, "basis_sha256": "a" * 64 + "," + "c" * 64}).save(tmp_path / "xl.safetensors")
    for path, kb in ((sd15, claim[1]), (xl, claim[2])):
        assert kb is not None and abs(path.stat().st_size / 1024 - int(kb)) <= 1, (path.name, path.stat().st_size, kb)


def test_every_export_format_has_one_definition():
    """A format is a name in config.EXPORT_FORMATS and an ExportFormat in export.EXPORTERS: nothing else to add."""
    from celebbasis.config import EXPORT_FORMATS
    from celebbasis.export import EXPORTERS

    assert set(EXPORTERS) == set(EXPORT_FORMATS)
