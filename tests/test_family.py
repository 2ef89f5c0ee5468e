"""The family seam: SD 1.x, SD 2.x and SDXL conditioning, tokenizers and pooling, as diffusers does them."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.inversion.data import encode_images, load_images
from engine.sd.family import describe_widths, family, family_of_widths
from engine.sd.models import model_info
from engine.sd.placeholder import add_slots, installed_in_all

EOS = 49407


def _with_slot(model, vectors_per_encoder):
    """Tokenizer copies that know one placeholder, and rows for it (one per encoder)."""
    tokenizers = [copy.deepcopy(tok) for _, tok in model.encoders]
    for tok in tokenizers:
        add_slots(tok, 1)
    return tokenizers, installed_in_all(model.encoders, vectors_per_encoder)


def _rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, w, generator=g) for w in model.info.text_widths]


def test_info_and_identity_carry_the_family():
    for spec, fam, widths in [("builtin:tiny", "sd1", (32,)), ("builtin:sd2-tiny", "sd2", (32,)),
                              ("builtin:sdxl-tiny", "sdxl", (32, 64)), ("builtin:sdxl-arch", "sdxl", (768, 1280)),
                              ("builtin:sd21-arch", "sd2", (1024,))]:
        info = model_info(spec)
        assert (info.family, info.text_widths) == (fam, widths), spec
        assert info.identity()["family"] == fam and info.identity()["text_widths"] == list(widths)
    assert model_info("builtin:sdxl-arch").resolution == 1024
    assert model_info("builtin:sdxl-tiny").family_label == "SDXL"


def test_widths_name_the_family():
    assert [family_of_widths(w) for w in [(768,), (1024,), (768, 1280), (32,), (1280,)]] == [
        "sd1", "sd2", "sdxl", None, None]
    assert describe_widths((768, 1280)) == "SDXL (widths 768 + 1280)"
    assert describe_widths((32,)) == "width 32"
    assert family("sdxl").standard_widths == (768, 1280) and family("sdxl").block_names == ("clip_l", "clip_g")


def test_sd1_conditioning_is_the_last_hidden_state(tiny_model):
    ids = family("sd1").tokenize([tiny_model.tokenizer], ["a photo of a cat"])
    cond = tiny_model.family.condition(tiny_model.encoders, ids)
    assert torch.equal(cond["encoder_hidden_states"], tiny_model.text_encoder(ids[0]).last_hidden_state)
    assert set(cond) == {"encoder_hidden_states"}


def test_sd2_and_sdxl_second_tokenizer_pad_with_bang():
    for tokenizer in (family("sd2").derived_tokenizers()[0], family("sdxl").derived_tokenizers()[1]):
        ids = tokenizer(["a photo"], padding="max_length", max_length=77).input_ids[0]
        assert ids[:4] == [49406, 320, 1125, EOS] and ids[4:] == [0] * 73  # "!" is id 0
    ids = family("sdxl").derived_tokenizers()[0](["a photo"], padding="max_length", max_length=77).input_ids[0]
    assert ids[4:] == [EOS] * 73


def test_sdxl_conditioning_equals_diffusers_encode_prompt_with_a_placeholder(sdxl_model):
    """Penultimate states of both encoders concatenated, encoder 2's pooled projection — and the
    placeholder's rows reach both encoders — exactly as StableDiffusionXLPipeline.encode_prompt."""
    from engine.sd.generation import generation_scheduler

    rows = _rows(sdxl_model)
    tokenizers, installed = _with_slot(sdxl_model, rows)
    prompt = "a photo of <tistudio-slot-0> on the beach"
    ids = sdxl_model.family.tokenize(tokenizers, [prompt])
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    pipe = sdxl_model.family.pipeline(sdxl_model, generation_scheduler(sdxl_model), tokenizers)
    with installed, torch.no_grad():
        ours = sdxl_model.family.condition(sdxl_model.encoders, ids, micro)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        plain = sdxl_model.family.condition(sdxl_model.encoders, sdxl_model.family.tokenize(
            tokenizers, ["a photo of cat on the beach"]), micro)
    assert ours["encoder_hidden_states"].shape == (1, 77, 96)
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(ours["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"], micro)
    # the placeholder's rows are what the encoders read: its conditioning differs from a plain word's
    assert not torch.equal(ours["encoder_hidden_states"][:, 4], plain["encoder_hidden_states"][:, 4])


def test_sdxl_pools_at_the_real_eos_not_at_the_placeholder(sdxl_model):
    """Placeholder ids exceed EOS; the legacy config (eos_token_id 2) would pool at argmax(ids),
    i.e. at the placeholder.  Training and generation both pool at the EOS position."""
    from engine.sd.generation import generation_scheduler

    rows = _rows(sdxl_model, seed=1)
    tokenizers, installed = _with_slot(sdxl_model, rows)
    prompt = "a photo of <tistudio-slot-0>"
    ids = sdxl_model.family.tokenize(tokenizers, [prompt])
    encoder_2 = sdxl_model.pipe.text_encoder_2
    assert int(ids[1].argmax()) == 4 and ids[1][0, 4] > EOS  # the placeholder is the largest id
    pipe = sdxl_model.family.pipeline(sdxl_model, generation_scheduler(sdxl_model), tokenizers)
    with installed, torch.no_grad():
        out = encoder_2(ids[1], output_hidden_states=True)
        last = out.last_hidden_state[0]
        at_eos = encoder_2.text_projection(last[5])  # bos a photo of <slot> EOS
        at_placeholder = encoder_2.text_projection(last[4])
        trained = sdxl_model.family.condition(sdxl_model.encoders, ids, torch.zeros(1, 6))
        _, _, generated, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert torch.equal(trained["added_cond_kwargs"]["text_embeds"][0], at_eos)
    assert torch.equal(generated[0], at_eos)
    assert not torch.allclose(at_eos, at_placeholder)
    assert encoder_2.config.eos_token_id == EOS


def test_sdxl_size_conditioning_from_each_cached_latent(sdxl_model, tmp_path):
    """add_time_ids = (original h, w, crop top, left, target h, w), per image, as diffusers' SDXL example."""
    from PIL import Image

    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (120, 80), "red").save(wide)
    Image.new("RGB", (64, 128), "blue").save(tall)
    cache = encode_images(sdxl_model.vae, load_images([wide, tall]), 64)
    assert cache.micro.tolist() == [[80, 120, 0, 0, 64, 64], [128, 64, 0, 0, 64, 64]]
    cropped = encode_images(sdxl_model.vae, load_images([wide, tall]), 64, center_crop=True)
    # the centred squares start 20 px in (of 80) / 32 px down (of 64): 16 / 32 in target pixels
    assert cropped.micro.tolist() == [[80, 120, 0, 16, 64, 64], [128, 64, 32, 0, 64, 64]]


def test_sdxl_vae_encodes_in_fp32_when_the_model_is_fp16(sdxl_model, image_dir):
    """SDXL's VAE overflows in fp16 (force_upcast): the cache is encoded in fp32, and the VAE is
    cast back afterwards, bit for bit."""
    vae = copy.deepcopy(sdxl_model.vae).to(torch.float16)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seen = []
    hook = vae.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    cache = encode_images(vae, load_images(sorted(image_dir.glob("*.png"))), 64)
    hook.remove()
    assert seen and all(d == torch.float32 for d in seen)
    assert cache.mean.dtype == torch.float32
    assert all(torch.equal(before[k], v) and v.dtype == torch.float16 for k, v in vae.state_dict().items())


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:sdxl-tiny"])
def test_encoders_are_frozen_and_placeholders_leave_them_as_they_were(spec, tiny_model, sdxl_model):
    model = tiny_model if spec == "builtin:tiny" else sdxl_model
    assert len(model.encoders) == len(model.info.text_widths)
    originals = [enc.get_input_embeddings() for enc, _ in model.encoders]
    with installed_in_all(model.encoders, _rows(model)):
        assert all(enc.get_input_embeddings() is not o for (enc, _), o in zip(model.encoders, originals))
    assert all(enc.get_input_embeddings() is o for (enc, _), o in zip(model.encoders, originals))
    assert not any(p.requires_grad for enc, _ in model.encoders for p in enc.parameters())
