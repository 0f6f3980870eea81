from celebbasis.resources import celeb_names, clip_tokenizer, example_face, example_prompts, names_sha256


def test_tokenizer_matches_stable_diffusion_1x():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok("sks", add_special_tokens=False).input_ids == [48136]
    assert tok("Barack Obama", add_special_tokens=False).input_ids == [22481, 4276]
    assert tok("a photo").input_ids == [49406, 320, 1125, 49407]
    assert tok.pad_token == "<|endoftext|>"


def test_openclip_padding_variant():
    tok = clip_tokenizer(pad_token="!")
    assert tok.pad_token_id == 0
    assert tok("sks", add_special_tokens=False).input_ids == [48136]


def test_packaged_names_are_sorted_unique_and_hashed():
    names = celeb_names()
    assert len(names) == 646
    assert names == sorted(set(names))
    assert names_sha256(names) == names_sha256(list(reversed(names)) + names[:5])
    assert names_sha256(names) != names_sha256(names[1:])


def test_packaged_prompts_and_face_exist():
    prompts = example_prompts()
    assert any("<id2>" in p for p in prompts) and all("<id1>" in p for p in prompts)
    assert example_face().stat().st_size > 100_000


def test_tiny_models_leave_the_callers_random_state_alone():
    import torch

    from celebbasis.testing import tiny_pipeline

    state = torch.random.get_rng_state()
    tiny_pipeline(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
