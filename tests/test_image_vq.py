import numpy as np
import pytest
import torch

from pipeline.demo.shapes import draw, scene_for
from pipeline.tokenizers.image_vq import VQAutoencoder, VQConfig, load, psnr, save, ssim

# A tiny model so every test stays fast on CPU.
TINY = dict(image_size=32, downsample=8, channels=16, channel_mult=(1, 1, 2), res_blocks=1,
            latent_dim=16, codebook_size=256, codebook_dim=8)


def shapes_batch(count: int, size: int = 32) -> torch.Tensor:
    """(count, 3, size, size) demo-shape images in [-1, 1]."""
    arrays = np.stack([np.asarray(draw(scene_for(i), size=size)) for i in range(count)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("change, field", [
    (dict(image_size=36), "image_size"),
    (dict(downsample=4), "downsample"),
    (dict(codebook_size=128), "codebook_size"),
    (dict(codebook_size=20000), "codebook_size"),
    (dict(quantizer="rvq"), "quantizer"),
    (dict(channel_mult=(1, 2)), "channel_mult"),
    (dict(quantizer="lfq", codebook_size=1000), "codebook_size"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"VQConfig.{field}"):
        VQConfig(**{**TINY, **change})


def test_encode_decode_shapes_and_code_range():
    torch.manual_seed(0)
    model = VQAutoencoder(VQConfig(**TINY))
    images = shapes_batch(4)
    model(images)  # first training-mode pass runs the k-means init
    model.eval()
    codes = model.encode(images)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 256
    assert torch.equal(codes, model.encode(images))  # deterministic in eval mode
    recon = model.decode(codes)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1


def test_save_load_gives_identical_tokens(tmp_path):
    torch.manual_seed(0)
    model = VQAutoencoder(VQConfig(**TINY))
    images = shapes_batch(4)
    model(images)
    model.eval()
    save(model, tmp_path / "vq")
    loaded = load(tmp_path / "vq")
    assert loaded.config == model.config
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = VQAutoencoder(VQConfig(**TINY, edge_weight=0.5, foreground_weight=1.0))
    images = shapes_batch(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, stats = model.loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(stats["loss"])
    assert set(stats) >= {"loss", "recon", "psnr", "usage", "perplexity"}
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.parametrize("quantizer, size, real", [("fsq", 256, 240), ("lfq", 256, 256)])
def test_fsq_and_lfq_round_trip_shapes(quantizer, size, real):
    torch.manual_seed(0)
    model = VQAutoencoder(VQConfig(**{**TINY, "quantizer": quantizer, "codebook_size": size}))
    assert model.config.num_codes == real
    images = shapes_batch(2)
    loss, stats = model.loss(images)
    loss.backward()
    model.eval()
    codes = model.encode(images)
    assert codes.shape == (2, 4, 4) and 0 <= codes.min() and codes.max() < real
    assert model.decode(codes).shape == images.shape


def test_psnr_and_ssim_on_unit_range():
    a = torch.rand(2, 3, 16, 16)
    assert psnr(a, a) > 90 and abs(ssim(a, a).item() - 1) < 1e-5
    noisy = (a + 0.1).clamp(0, 1)
    assert 15 < psnr(a, noisy) < 30  # error at most 0.1 of the data range 1: at least 20 dB
    assert ssim(a, noisy) < 1


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_quantizer_runs_in_fp32_under_bf16_autocast(quantizer):
    torch.manual_seed(0)
    model = VQAutoencoder(VQConfig(**{**TINY, "quantizer": quantizer}))
    images = shapes_batch(2)
    model(images)                                             # vq: the k-means init
    model.eval()
    seen = []
    model.quantizer.register_forward_pre_hook(lambda module, args: seen.append(
        (args[0].dtype, torch.is_autocast_enabled("cpu"))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encoder(images)
        quantized, indices, _ = model.quantize(z)
    assert z.dtype == torch.bfloat16                          # the convolutions did autocast
    assert seen == [(torch.float32, False)] and quantized.dtype == torch.float32
    assert torch.equal(indices, model.quantize(z.float())[1])  # the same codes as an fp32 call
