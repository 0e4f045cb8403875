"""Diffusion transformers (diffusers): the attention of image and video denoisers, found and
rewritten, and the rewritten denoiser run by its own pipeline.

Small models from configurations with random weights (no download). The reference for MTA is the
model itself with every self-attention SDPA call it makes replaced by the float64 reference of
MTA_SPEC.md (``mta_attention_reference``, the call's own mask included); the one-chunk rewrite
must equal the model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import mta_rewrite as mr
from mta_rewrite.ops.reference import mta_attention_reference

D = pytest.importorskip("diffusers")

CFG = mr.MTAConfig(chunk_size=8, local_chunks=1, sinks=2)
ONE_CHUNK = mr.MTAConfig(chunk_size=1 << 20)


@contextlib.contextmanager
def reference_attention(config: mr.MTAConfig):
    """Every SDPA call whose queries and keys are one sequence (self-attention) computes MTA by
    the float64 reference instead; cross-attention stays SDPA. Yields the count of each."""
    sdpa = F.scaled_dot_product_attention
    counts = {"mta": 0, "exact": 0}

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.shape[-2] == key.shape[-2]:
            counts["mta"] += 1
            return mta_attention_reference(query, key, value, attn_mask, chunk_size=config.chunk_size, causal=is_causal,
                                           scale=scale, local_chunks=config.local_chunks,
                                           sinks=config.sinks).to(query.dtype)
        counts["exact"] += 1
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", patched)
        yield counts


def _flux():
    model = D.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    g = torch.Generator().manual_seed(1)
    image, text = 64, 20
    inputs = dict(hidden_states=torch.randn(1, image, 4, generator=g), encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.randn(image, 3, generator=g),
                  txt_ids=torch.randn(text, 3, generator=g), timestep=torch.tensor([0.5]))
    # the joint blocks attend over text and image tokens together: one sequence of 84
    return model, [inputs], {"transformer_blocks.0.attn": (84, True), "single_transformer_blocks.0.attn": (84, True)}


def _sd3():
    model = D.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
                                    dual_attention_layers=(0,), qk_norm="rms_norm")
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
                  pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([3, 500]))
    # SD3.5's dual attention: a second self-attention over the image tokens alone
    return model, [inputs], {"transformer_blocks.0.attn": (76, True), "transformer_blocks.0.attn2": (64, True),
                           "transformer_blocks.1.attn": (76, True)}


def _wan():
    model = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                    out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
                                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 10, 16, generator=g),
                  timestep=torch.tensor([500]))
    # a video of 3 × 4 × 4 patches; the cross-attention to the text stays exact
    return model, [inputs], {"blocks.0.attn1": (48, True), "blocks.0.attn2": (48, False)}


def _qwen_image():
    model = D.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # the second prompt is 6 tokens: its text padding is masked out of the joint attention
    inputs = dict(hidden_states=torch.randn(2, 36, 16, generator=g), encoder_hidden_states=torch.randn(2, 10, 16, generator=g),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([1.0, 0.3]), img_shapes=[(1, 6, 6)] * 2)
    return model, [inputs], {"transformer_blocks.0.attn": (46, True)}


def _framepack_inputs(prompt_tokens: int):
    """HunyuanVideo-Framepack's inputs, batch 1, with ``prompt_tokens`` of its 12 prompt tokens real."""
    g = torch.Generator().manual_seed(5)
    frames, mask = 3, torch.zeros(1, 12)
    mask[:, :prompt_tokens] = 1.0
    video = lambda n: torch.randn(1, 4, n, 4, 4, generator=g)  # noqa: E731
    return dict(hidden_states=video(frames), timestep=torch.tensor([300]),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g),
                encoder_attention_mask=mask, guidance=torch.tensor([400]), image_embeds=torch.randn(1, 12, 16, generator=g),
                indices_latents=torch.ones(frames), latents_clean=video(2), indices_latents_clean=torch.ones(2),
                latents_history_2x=video(2), indices_latents_history_2x=torch.ones(2), latents_history_4x=video(8),
                indices_latents_history_4x=torch.ones(8))


def _framepack():
    """HunyuanVideo-Framepack, batch 1: the model cuts the prompt to its real tokens by the mask's
    sum (``.item()``: a length torch.export cannot know), and its single-stream blocks apply the
    rotary embedding to the image tokens alone, cutting q and k at that length. torch.export gives
    each cut its own unknown size, so q's and k's lengths came out as different symbols (u9 + 23
    against u12 + 23) and the single-stream site was reported as cross-attention and left exact;
    cuts with the same bounds of equally long sequences are equally long
    (passes.match.equal_slice_lengths). Run at the captured 12 prompt tokens and at 7: the program
    follows the prompt's length."""
    model = D.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True)
    return model, [_framepack_inputs(12), _framepack_inputs(7)], {
        "context_embedder.token_refiner.refiner_blocks.0.attn": (12, True), "transformer_blocks.0.attn": (None, True),
        "single_transformer_blocks.0.attn": (None, True)}


@pytest.mark.parametrize("build", [_flux, _sd3, _wan, _qwen_image, _framepack],
                         ids=["flux", "sd3", "wan", "qwen-image", "framepack"])
def test_diffusion_transformers_are_rewritten_as_the_reference(build):
    """``build`` gives the model, its inputs (captured from the first; every one run) and the sites
    expected."""
    torch.manual_seed(0)
    model, runs, expected = build()
    model.eval()
    kwargs = dict(runs[0], return_dict=False)
    sites = mr.find_attention(model, (), kwargs)
    assert {s.name: (s.seq_len, s.rewritable) for s in sites} == expected
    assert all("cross-attention" in s.reason for s in sites if not s.rewritable)

    one = mr.rewrite(model, (), kwargs, config=ONE_CHUNK)
    fast = mr.rewrite(model, (), kwargs, config=CFG)
    for inputs in runs:
        kwargs = dict(inputs, return_dict=False)
        with torch.no_grad():
            original = model(**kwargs)[0]
            torch.testing.assert_close(one(**kwargs)[0], original, rtol=0, atol=1e-6)
            got = fast(**kwargs)[0]
            with reference_attention(CFG) as counts:
                reference = model(**kwargs)[0]
        assert counts["mta"] == sum(rewritable for _, rewritable in expected.values())
        assert counts["exact"] == sum(not rewritable for _, rewritable in expected.values())
        assert (reference - original).abs().max() > 1e-3  # (MTA differs from exact attention here)
        torch.testing.assert_close(got, reference, rtol=0, atol=2e-5)


def _flux_pipeline():
    torch.manual_seed(0)
    transformer = _flux()[0].eval()
    vae = D.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                          latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.0609, scaling_factor=1.5035, mid_block_add_attention=False)
    # (no attention in the autoencoder: every attention call of a generation is the denoiser's)
    # no text encoders: the prompt comes as its embeddings
    return D.FluxPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def test_a_rewritten_denoiser_runs_in_its_pipeline():
    """diffusers' pipelines read their denoiser's ``config``, ``dtype`` and ``device`` and enter its
    ``cache_context`` around each call: the rewritten module answers them, and the pipeline
    generates with it, at the captured size and another."""
    pipe = _flux_pipeline()
    g = torch.Generator().manual_seed(5)
    prompt = dict(prompt_embeds=torch.randn(1, 12, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))

    def generate(size: int):
        return pipe(**prompt, num_inference_steps=2, height=size, width=size, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    transformer = pipe.transformer
    with mr.record_calls(transformer) as calls:
        original = generate(32)
    assert len(calls) == 1  # (the first of the two steps' calls)
    args, kwargs = calls[0]  # the pipeline's own call of its denoiser: the example to capture

    pipe.transformer = mr.rewrite(transformer, args, kwargs, config=ONE_CHUNK)
    assert pipe.transformer.config is transformer.config
    assert copy.deepcopy(pipe.transformer).config == transformer.config  # (kept as rewrite's other attributes)
    assert (pipe.transformer.dtype, pipe.transformer.device) == (torch.float32, torch.device("cpu"))
    torch.testing.assert_close(generate(32), original, rtol=0, atol=1e-6)

    pipe.transformer = mr.rewrite(transformer, args, kwargs, config=CFG)
    got = generate(48)  # 576 image tokens where the capture saw 256
    pipe.transformer = transformer
    with reference_attention(CFG) as counts:
        reference = generate(48)
    assert counts["mta"] == 2 * 2 and counts["exact"] == 0  # two sites, two steps
    assert got.shape == (1, 3, 48, 48)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
