"""Model shapes, the loss reduction and the beta schedules."""
import pytest
import torch
from torch import nn

import run_vae
from run_vae import VAE, ResBlock, beta_at, lr_factor_at, vae_loss


@pytest.mark.parametrize("size", [16, 64, 128])
def test_shapes_follow_image_size(size):
    model = VAE(size, latent_dim=32).eval()
    x = torch.rand(2, 3, size, size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (2, 32)
    assert 0 <= x_hat.min() and x_hat.max() <= 1  # sigmoid output for [0,1] data


def test_architecture_matches_the_design():
    model = VAE(64, 128)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)), (256, 512, (4, 4), (2, 2))]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(d.in_channels, d.out_channels) for d in deconvs] == [(512, 256), (256, 128), (128, 64), (64, 3)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder) == 3
    assert model.fc_mu.in_features == 512 * 4 * 4 and model.fc_decode.in_features == 128


@pytest.mark.parametrize("size, upsample, mode", [(16, "resize", "nearest"), (64, "resize", "nearest"),
                                                  (16, "bilinear", "bilinear")])
def test_resize_decoder_doubles_by_interpolation_and_a_3x3_conv(size, upsample, mode):
    model = VAE(size, latent_dim=32, upsample=upsample).eval()
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder)
    ups = [m for m in model.decoder if isinstance(m, torch.nn.Upsample)]
    convs = [m for m in model.decoder if isinstance(m, torch.nn.Conv2d)]
    assert len(ups) == 4 and all(u.scale_factor == 2 and u.mode == mode for u in ups)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (512, 256, (3, 3), (1, 1)), (256, 128, (3, 3), (1, 1)), (128, 64, (3, 3), (1, 1)), (64, 3, (3, 3), (1, 1))]
    assert model.decoder[-2] is convs[-1]  # the layer the adaptive adversarial weight is measured at
    x_hat, _, _ = model(torch.rand(2, 3, size, size))
    assert x_hat.shape == (2, 3, size, size)
    # the encoder and the heads are the original design's: only the way up differs
    assert [k for k in model.state_dict() if not k.startswith("decoder")] == \
        [k for k in VAE(size, latent_dim=32).state_dict() if not k.startswith("decoder")]


def period_2_energy_share(x):
    """The share of a map's energy (mean removed) at the highest frequencies, where a 2x upsampling leaves its
    aliased copy of the low-resolution spectrum: the outer half of the 2-D spectrum in either direction."""
    spectrum = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    n = x.shape[-1]
    freq = torch.fft.fftfreq(n).abs()
    high = (freq[:, None] > 0.25) | (freq[None, :] > 0.25)
    return (spectrum * high).sum() / spectrum.sum()


def test_bilinear_doubling_leaves_less_alias_energy_than_nearest_neighbour():
    torch.manual_seed(0)
    features = torch.randn(4, 8, 16, 16)  # white: its whole spectrum is copied up by a doubling
    shares = {}
    for upsample in ("resize", "bilinear"):
        doubling = next(m for m in VAE(16, latent_dim=8, upsample=upsample).decoder if isinstance(m, torch.nn.Upsample))
        shares[upsample] = period_2_energy_share(doubling(features)).item()
    # nearest-neighbour doubling filters with [1 1], power response cos^2(w/2): about a third of a white map's
    # energy lands in the outer band in theory, 28 % on these maps (edges). Bilinear filters with [1 3 3 1]/4,
    # power cos^6(w/2): about 7 %.
    assert 0.22 < shares["resize"] < 0.38
    assert shares["bilinear"] < 0.1 and shares["bilinear"] < shares["resize"] / 3


@pytest.mark.parametrize("upsample", ["transposed", "resize", "bilinear"])
def test_final_conv_writes_the_pixels_with_a_3x3_conv_at_full_resolution(upsample):
    model = VAE(16, latent_dim=8, upsample=upsample, final_conv=True).eval()
    last = model.decoder[-2]  # the layer the adaptive adversarial weight is measured at
    assert isinstance(last, torch.nn.Conv2d) and (last.in_channels, last.out_channels) == (32, 3)
    assert last.kernel_size == (3, 3) and last.stride == (1, 1)
    # the layer before it is a BatchNorm and ReLU at full resolution: feature maps, not pixels
    h = torch.randn(2, 512, 1, 1)
    for layer in model.decoder[:-2]:
        h = layer(h)
    assert h.shape == (2, 32, 16, 16) and h.min() >= 0
    # every output pixel now depends on its 3x3 neighbourhood of those feature maps
    h = h.detach().requires_grad_(True)
    model.decoder[-2](h)[0, :, 8, 8].sum().backward()
    assert (h.grad[0].abs().sum(0) > 0).nonzero().tolist() == [[i, j] for i in (7, 8, 9) for j in (7, 8, 9)]
    assert model(torch.rand(2, 3, 16, 16))[0].shape == (2, 3, 16, 16)


def test_a_new_residual_block_is_the_identity_and_then_learns_a_3x3_correction():
    torch.manual_seed(0)
    block = ResBlock(8).eval()
    x = torch.rand(2, 8, 6, 6)  # non-negative, as the ReLU before it leaves its input
    assert torch.equal(block(x), x)
    torch.nn.init.ones_(block.body[-1].weight)  # as if trained: the body now adds to the skip
    h = x.clone().requires_grad_(True)
    block(h)[0, :, 3, 3].sum().backward()
    assert (h.grad[0].abs().sum(0) > 0).nonzero().tolist() == [[i, j] for i in range(1, 6) for j in range(1, 6)]


@pytest.mark.parametrize("final_conv, resolutions", [(False, [8]), (True, [8, 16])])
def test_res_blocks_follow_the_doublings_to_half_and_full_resolution(final_conv, resolutions):
    model = VAE(16, latent_dim=8, final_conv=final_conv, res_blocks=2).eval()
    plain = VAE(16, latent_dim=8, final_conv=final_conv).eval()
    h, seen = torch.randn(2, 512, 1, 1), []
    for layer in model.decoder:
        if isinstance(layer, ResBlock):
            seen.append(h.shape[-1])
        h = layer(h)
    assert seen == [r for r in resolutions for _ in range(2)]
    assert model.decoder[-2].out_channels == 3  # still the layer the adaptive adversarial weight is measured at
    assert len(model.decoder) == len(plain.decoder) + 2 * len(resolutions)
    # new blocks are identities: with the other weights copied, the decoder draws what the plain one draws
    weights = {k: v for k, v in plain.state_dict().items() if not k.startswith("decoder")}
    model.load_state_dict(weights, strict=False)
    shared = [m for m in model.decoder if not isinstance(m, ResBlock)]
    for mine, theirs in zip(shared, plain.decoder):
        mine.load_state_dict(theirs.state_dict())
    z = torch.randn(3, 8)
    assert torch.allclose(model.decode(z), plain.decode(z), atol=1e-6)


@pytest.mark.parametrize("final_conv", [False, True])
def test_channels_set_every_width_of_encoder_and_decoder(final_conv):
    model = VAE(32, latent_dim=8, num_classes=2, final_conv=final_conv, res_blocks=1, channels=16).eval()
    encoder = [m.out_channels for m in model.encoder if isinstance(m, nn.Conv2d)]
    decoder = [m.out_channels for m in model.decoder if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    assert encoder == [16, 32, 64, 128]
    assert decoder[:3] == [64, 32, 16] and decoder[-1] == 3
    assert (decoder[3] == 8) == final_conv
    assert model.fc_mu.in_features == 128 * 2 * 2 and model.fc_decode.out_features == 128 * 2 * 2
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 0])
    x_hat, mu, _ = model(x, y)
    assert x_hat.shape == x.shape and mu.shape == (3, 8)
    wide = VAE(32, latent_dim=8, num_classes=2, final_conv=final_conv, res_blocks=1, channels=32)
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in model.parameters())


def test_conditional_model_takes_labels_at_both_ends():
    model = VAE(32, latent_dim=16, num_classes=3).eval()
    assert model.encoder[0].in_channels == 6 and model.fc_decode.in_features == 19
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    x_hat, mu, _ = model(x, y)
    assert x_hat.shape == x.shape and mu.shape == (4, 16)
    z = torch.randn(1, 16).repeat(3, 1)
    out = model.decode(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1])  # the label changes the image for the same z
    samples = model.sample(3, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("final_conv, doublings", [(False, 3), (True, 4)])
def test_class_norm_lets_the_label_steer_each_doubling_to_feature_maps(final_conv, doublings):
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, num_classes=2, final_conv=final_conv, class_norm=True).eval()
    norms = [m for m in model.decoder if isinstance(m, run_vae.ClassBatchNorm)]
    assert len(norms) == doublings
    with torch.no_grad():
        model.fc_decode.weight[:, 8:] = 0  # close the label's way in through the first layer
    z, y0, y1 = torch.randn(3, 8), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    assert torch.allclose(model.decode(z, y0), model.decode(z, y1))  # scale and shift start at 0: plain BatchNorm
    for norm in norms:  # each layer's own scale and shift reach the image, with the others at 0
        with torch.no_grad():
            norm.gamma.normal_(0, 0.5)
            norm.beta.normal_(0, 0.5)
        assert not torch.allclose(model.decode(z, y0), model.decode(z, y1), atol=1e-4)
        with torch.no_grad():
            norm.gamma.zero_()
            norm.beta.zero_()
    with torch.no_grad():
        for norm in norms:
            norm.gamma.normal_(0, 0.5)
            norm.beta.normal_(0, 0.5)
    blend = model.decode(z, torch.full((3, 2), 0.5))  # the gallery's class blends
    assert blend.shape == (3, 3, 16, 16) and torch.isfinite(blend).all()


def test_class_norm_decodes_stay_apart_when_one_starts_inside_another():
    """The gallery's sessions share one model across threads: a decode that starts while another is half
    way through (here from a hook on the first one's second ClassBatchNorm) must not change either."""
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, num_classes=2, class_norm=True).eval()
    norms = [m for m in model.decoder if isinstance(m, run_vae.ClassBatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.gamma.normal_(0, 0.5)
            norm.beta.normal_(0, 0.5)
    z, y0, y1 = torch.randn(3, 8), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        alone0, alone1 = model.decode(z, y0), model.decode(z[:2], y1[:2])
        inner = []

        def decode_another(*_):
            if not inner:  # once: the hook fires inside the inner decode too
                inner.append(None)
                inner[0] = model.decode(z[:2], y1[:2])

        hook = norms[1].register_forward_hook(decode_another)
        try:
            outer = model.decode(z, y0)
        finally:
            hook.remove()
    assert torch.equal(outer, alone0) and torch.equal(inner[0], alone1)


def test_without_encoder_label_the_code_depends_on_the_image_alone_and_the_label_still_steers_the_decoder():
    torch.manual_seed(0)
    x, y0, y1 = torch.rand(3, 3, 16, 16), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    textbook = VAE(16, latent_dim=8, num_classes=2).eval()
    assert textbook.encoder[0].in_channels == 5
    assert not torch.allclose(textbook.encode(x, y0)[0], textbook.encode(x, y1)[0])
    image_only = VAE(16, latent_dim=8, num_classes=2, encoder_label=False).eval()
    assert image_only.encoder[0].in_channels == 3
    assert torch.equal(image_only.encode(x, y0)[0], image_only.encode(x, y1)[0])
    z = torch.randn(3, 8)
    assert not torch.allclose(image_only.decode(z, y0), image_only.decode(z, y1))
    cfg = run_vae.load_config(None, ["model.conditional=true", "model.encoder_label=false", "data.image_size=16"])
    assert run_vae.build_model(cfg, 2).encoder[0].in_channels == 3


def test_a_class_norm_config_without_classes_says_what_to_set():
    cfg = run_vae.load_config(None, ["model.conditional=true", "model.class_norm=true", "data.image_size=16"])
    assert any(isinstance(m, run_vae.ClassBatchNorm) for m in run_vae.build_model(cfg, 3).decoder)
    with pytest.raises(run_vae.ConfigError, match="class_norm needs class labels"):
        run_vae.build_model(cfg, 0)


def test_reconstruct_decodes_the_posterior_mean_without_noise():
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, num_classes=2).eval()
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 1])
    mu, _ = model.encode(x, y)
    assert torch.equal(model.reconstruct(x, y), model.decode(mu, y))
    assert torch.equal(model.reconstruct(x, y), model.reconstruct(x, y))
    assert not torch.allclose(model.reconstruct(x, y), model(x, y)[0])  # forward samples z, reconstruct does not


def test_loss_is_summed_over_pixels_and_latents_and_averaged_over_batch():
    x, x_hat = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    mu, logvar = torch.ones(2, 5), torch.zeros(2, 5)
    recon, kl, kl_dim = vae_loss(x, x_hat, mu, logvar)
    assert recon.item() == pytest.approx(48 * 0.25)   # 48 pixels per image, each (0.5)^2
    assert kl.item() == pytest.approx(5 * 0.5)         # 0.5 * mu^2 per dim
    assert kl_dim.shape == (5,)
    # beta means the same at any batch size: a batch of copies has the same loss
    r4, k4, _ = vae_loss(x.repeat(2, 1, 1, 1), x_hat.repeat(2, 1, 1, 1), mu.repeat(2, 1), logvar.repeat(2, 1))
    assert r4.item() == pytest.approx(recon.item()) and k4.item() == pytest.approx(kl.item())


def test_kl_matches_the_closed_form_for_a_known_gaussian():
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.log(torch.tensor([[4.0, 0.25]]))
    _, kl, _ = vae_loss(torch.zeros(1, 1), torch.zeros(1, 1), mu, logvar)
    expected = sum(0.5 * (s2 + m ** 2 - 1 - torch.log(torch.tensor(s2)).item()) for m, s2 in [(1, 4), (-2, 0.25)])
    assert kl.item() == pytest.approx(expected)


def test_beta_constant_when_schedules_are_off():
    assert beta_at(0, 10, 0.7) == beta_at(1000, 10, 0.7) == 0.7


def test_beta_warmup_is_linear_per_step_then_holds():
    spe = 10  # steps per epoch; warm-up over 2 epochs = 20 steps
    assert beta_at(0, spe, 2.0, warmup_epochs=2) == 0.0
    assert beta_at(5, spe, 2.0, warmup_epochs=2) == pytest.approx(0.5)   # mid first epoch: per step
    assert beta_at(10, spe, 2.0, warmup_epochs=2) == pytest.approx(1.0)
    assert beta_at(20, spe, 2.0, warmup_epochs=2) == pytest.approx(2.0)
    assert beta_at(500, spe, 2.0, warmup_epochs=2) == pytest.approx(2.0)


def test_beta_cycle_ramps_over_first_half_then_holds_and_restarts():
    spe = 10  # cycle of 4 epochs = 40 steps, ramp over 20
    values = [beta_at(s, spe, 1.0, cycle_epochs=4) for s in (0, 10, 20, 30, 39, 40, 50, 60)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0])
    # cyclic wins over warm-up when both are given
    assert beta_at(40, spe, 1.0, warmup_epochs=2, cycle_epochs=4) == 0.0


def test_lr_warmup_ramps_linearly_then_hands_over_to_the_schedule():
    assert [lr_factor_at(s, 100, "constant", warmup_steps=4) for s in (0, 1, 3, 4, 99)] == \
        pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])
    assert [lr_factor_at(s, 100, "constant") for s in (0, 50)] == [1.0, 1.0]
    cosine = [lr_factor_at(s, 100, "cosine") for s in (0, 50, 100)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    # warm-up scales the cosine: step 1 of 4 warm-up steps at the cosine's value for step 1
    assert lr_factor_at(1, 100, "cosine", 4) == pytest.approx(0.5 * lr_factor_at(1, 100, "cosine"))


def test_evaluation_counts_collapsed_latent_dims(image_folder):
    from run_vae import evaluate_elbo, load_image_folder
    data = load_image_folder(image_folder, 16)
    model = VAE(16, latent_dim=8)
    with torch.no_grad():  # dims 3..7 always encode N(0, 1): the prior itself, zero KL, no information
        for layer in (model.fc_mu, model.fc_logvar):
            layer.weight[3:] = 0
            layer.bias[3:] = 0
        model.fc_mu.bias[:3] = 1.0  # dims 0..2 clearly away from the prior
    metrics, kl_dims = evaluate_elbo(model, data, torch.device("cpu"))
    assert kl_dims.shape == (8,) and torch.all(kl_dims[3:] == 0) and torch.all(kl_dims[:3] > 0.01)
    assert metrics["active_units"] == 3 and metrics["val_kl"] == pytest.approx(float(kl_dims.sum()))


def test_validation_under_bf16_autocast_matches_float32(image_folder):
    """Training validates under its own autocast; bf16 must change the figures only at rounding level."""
    from run_vae import evaluate_elbo, load_image_folder
    data = load_image_folder(image_folder, 16)
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, num_classes=len(data.classes))
    fp32, kl32 = evaluate_elbo(model, data, torch.device("cpu"))
    bf16, kl16 = evaluate_elbo(model, data, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert bf16["val_recon"] == pytest.approx(fp32["val_recon"], rel=0.02)
    assert bf16["val_kl"] == pytest.approx(fp32["val_kl"], rel=0.05)
    assert bf16["val_recon"] != fp32["val_recon"]  # bf16 really ran: its rounding shows in the sums
    assert kl16.dtype == kl32.dtype == torch.float32


def test_batches_cover_the_set_once_and_land_on_the_requested_device():
    from run_vae import iterate_batches, num_batches
    g = torch.Generator().manual_seed(0)
    batches = iterate_batches(10, 4, g)
    assert len(batches) == num_batches(10, 4) == 2 and all(len(b) == 4 for b in batches)  # short batch dropped
    assert len(set(torch.cat(batches).tolist())) == 8
    assert num_batches(3, 4) == 1 and [len(b) for b in iterate_batches(3, 4, g)] == [3]  # the only batch stays
    assert [len(b) for b in iterate_batches(10, 4, g, drop_last=False)] == [4, 4, 2]
    # the same order on any device, copied there once ("meta" stands in for a GPU)
    on_cpu = iterate_batches(10, 4, torch.Generator().manual_seed(1))
    on_meta = iterate_batches(10, 4, torch.Generator().manual_seed(1), device="meta")
    assert all(b.device.type == "meta" for b in on_meta) and [b.shape for b in on_meta] == [b.shape for b in on_cpu]


def test_prior_is_standard_normal_until_fitted_then_maps_noise_per_class():
    torch.manual_seed(0)
    model = VAE(16, latent_dim=4, num_classes=2).eval()
    eps, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(model.prior_z(eps, y), eps)  # N(0, I): the noise itself, bit for bit
    mean = torch.tensor([[1.0, 2, 3, 4], [-1, -2, -3, -4]])
    tril = torch.stack([torch.eye(4) * 2, torch.tril(torch.ones(4, 4))])
    model.set_prior(mean, tril)
    expected = torch.stack([mean[k] + tril[k] @ e for k, e in zip(y.tolist(), eps)])
    assert torch.allclose(model.prior_z(eps, y), expected)
    halfway = model.prior_z(eps[:1], torch.tensor([[0.5, 0.5]]))  # a blend of labels blends the Gaussians
    assert torch.allclose(halfway, 0.5 * (expected[0] + mean[1] + tril[1] @ eps[0]))
    model.reset_prior()
    assert torch.equal(model.prior_z(eps, y), eps)
    with pytest.raises(ValueError, match="labels"):
        model.prior_z(eps)


def test_fitted_prior_matches_the_moments_of_the_aggregate_posterior():
    from run_vae import ImageSet, fit_prior
    torch.manual_seed(0)
    model = VAE(16, latent_dim=3, num_classes=3).eval()
    images = (torch.rand(40, 3, 16, 16) * 255).to(torch.uint8)
    labels = torch.tensor([0] * 25 + [1] * 15)  # class 2 has no images: it keeps N(0, I)
    fit_prior(model, ImageSet(images, labels, ["a", "b", "c"], []), "cpu", batch_size=16)
    mu, logvar = model.encode(images.float() / 255, labels)
    for k, rows in ((0, slice(0, 25)), (1, slice(25, 40))):
        m, v = mu[rows].double(), logvar[rows].double().exp()
        cov = torch.cov(m.T, correction=0) + torch.diag(v.mean(0))  # the mixture of the posteriors' moments
        assert torch.allclose(model.prior_mean[k].double(), m.mean(0), atol=1e-5)
        tril = model.prior_scale_tril[k].double()
        assert torch.allclose(tril @ tril.T, cov, atol=1e-4)
    assert torch.equal(model.prior_mean[2], torch.zeros(3)) and torch.equal(model.prior_scale_tril[2], torch.eye(3))
    # sampling follows the fit: many draws of class 0 have its mean and covariance
    draws = model.prior_z(torch.randn(20000, 3), torch.zeros(20000, dtype=torch.long)).double()
    assert torch.allclose(draws.mean(0), model.prior_mean[0].double(), atol=0.05 * draws.std(0).max())
    t0 = model.prior_scale_tril[0].double()
    assert torch.allclose(torch.cov(draws.T), t0 @ t0.T, rtol=0.1, atol=0.05 * (t0 @ t0.T).diag().max())


def test_mixture_prior_finds_the_modes_the_images_were_encoded_to():
    from run_vae import ImageSet, fit_prior
    torch.manual_seed(0)
    model = VAE(16, latent_dim=2, num_classes=3, prior_components=2).eval()
    # class 0: 30 images encoded near (-5, 0), 70 near (5, 0); class 1: one image; class 2: none
    side = torch.tensor([0] * 30 + [1] * 70 + [1])
    images = (side * 255).to(torch.uint8)[:, None, None, None].expand(-1, 3, 16, 16).contiguous()
    labels = torch.tensor([0] * 100 + [1])
    jitter = torch.randn(101, 2) * 0.3

    def encode(x, y):  # a stand-in encoder: the pixel value says which mode, the posterior variance is 0.01
        mu = torch.stack([x[:, 0, 0, 0] * 10 - 5, torch.zeros(len(x))], 1) + jitter[:len(x)]
        return mu, torch.full_like(mu, 0.01).log()
    model.encode = encode
    fit_prior(model, ImageSet(images, labels, ["a", "b", "c"], []), "cpu", batch_size=101)
    weight, mean = model.prior_mix_weight[0], model.prior_mix_mean[0]
    left = mean[:, 0].argmin()
    assert torch.allclose(weight[left], torch.tensor(0.3), atol=1e-4) and abs(mean[left, 0] + 5) < 0.2
    assert torch.allclose(weight[1 - left], torch.tensor(0.7), atol=1e-4) and abs(mean[1 - left, 0] - 5) < 0.2
    tril = model.prior_mix_scale_tril[0, left]
    spread = torch.cov(jitter[:30].T, correction=0) + 0.01 * torch.eye(2)  # each mode widened by the posteriors
    assert torch.allclose(tril @ tril.T, spread, atol=0.01)
    # fewer images than components: one component on the image; no images: N(0, I)
    assert torch.equal(model.prior_mix_weight[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(model.prior_mix_mean[1, 0], torch.tensor([5.0, 0.0]) + jitter[100], atol=1e-5)
    assert torch.equal(model.prior_mix_weight[2], torch.tensor([1.0, 0.0]))
    assert torch.equal(model.prior_mix_mean[2], torch.zeros(2, 2))
    # samples follow the mixture, picks in proportion to the weights; the one Gaussian fills the gap between
    eps, zeros = torch.randn(20000, 2), torch.zeros(20000, dtype=torch.long)
    mixed = model.prior_z(eps, zeros, pick=torch.rand(20000))
    assert abs((mixed[:, 0] > 0).float().mean() - 0.7) < 0.02
    assert (mixed[:, 0].abs() < 2).float().mean() < 0.01
    assert (model.prior_z(eps, zeros)[:, 0].abs() < 2).float().mean() > 0.2
    # the overall Gaussian keeps the moments of all the posteriors
    assert abs(model.prior_mean[0, 0] - 2.0) < 0.2


def test_mixture_samples_are_seeded_and_reset_gives_standard_normal():
    model = VAE(16, latent_dim=4, num_classes=2, prior_components=3).eval()
    model.prior_mix_mean.normal_()
    y = torch.tensor([0, 1, 1])
    draw = lambda seed: model.sample(3, y, generator=torch.Generator().manual_seed(seed))
    with run_vae.fixed_noise(0):
        assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    grid, per_class, _ = run_vae.sample_grid(model, ["a", "b"], 2, 0)
    assert grid.shape == (4, 3, 16, 16) and per_class == 2
    saved = model.prior_state()
    model.reset_prior()
    eps = torch.randn(5, 4)
    assert torch.allclose(model.prior_z(eps, torch.tensor([0, 1, 0, 1, 1]), pick=torch.rand(5)), eps)
    model.load_prior(saved)
    assert torch.equal(model.prior_mix_mean, saved["prior_mix_mean"])
    # one Gaussian per class draws from the generator exactly what it drew before mixtures existed, and a
    # mixture given its own generator for the picks leaves the noise stream as it is: batches stay paired
    single = VAE(16, latent_dim=4, num_classes=2).eval()
    assert "prior_mix_weight" not in single.prior_state()
    bare = torch.Generator().manual_seed(0)
    torch.randn(3, 4, generator=bare)
    for sampler, picks in [(single, None), (model, torch.Generator().manual_seed(1))]:
        g = torch.Generator().manual_seed(0)
        with run_vae.fixed_noise(0):
            sampler.sample(3, y, generator=g, pick_generator=picks)
        assert torch.equal(g.get_state(), bare.get_state())


def test_a_mixture_sample_takes_no_more_memory_with_more_classes():
    """Memory linear in the draws: each row needs its own class's component only. Gathering every class's
    for every row would make the 40-class peak 40 times the one-class peak."""
    from torch.profiler import ProfilerActivity, profile
    n, d = 200, 32
    def peak_bytes(num_classes):
        model = VAE(16, latent_dim=d, num_classes=num_classes, prior_components=4).eval()
        model.prior_mix_mean.normal_()
        eps, y, pick = torch.randn(n, d), torch.arange(n) % num_classes, torch.rand(n)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.prior_z(eps, y, pick)
        return max(e.cpu_memory_usage for e in prof.events())
    one = peak_bytes(1)
    assert one >= n * d * 4  # the profiler saw the draws' own tensors
    assert peak_bytes(40) <= 1.5 * one


def test_a_mixture_that_does_not_fit_leaves_its_class_one_gaussian(monkeypatch, capsys):
    from run_vae import ImageSet, fit_prior
    from sklearn.mixture import GaussianMixture
    def collapse(self, z):
        raise ValueError("Fitting the mixture model failed because some components have ill-defined covariance")
    monkeypatch.setattr(GaussianMixture, "fit", collapse)
    torch.manual_seed(0)
    model = VAE(16, latent_dim=2, num_classes=1, prior_components=3).eval()
    images = (torch.rand(50, 3, 16, 16) * 255).to(torch.uint8)
    fit_prior(model, ImageSet(images, torch.zeros(50, dtype=torch.long), ["a"], []), "cpu")
    assert "class 0 did not fit" in capsys.readouterr().out
    assert torch.equal(model.prior_mix_weight[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(model.prior_mix_mean[0, 0], model.prior_mean[0])
    assert torch.equal(model.prior_mix_scale_tril[0, 0], model.prior_scale_tril[0])
    assert not torch.equal(model.prior_mean[0], torch.zeros(2))  # a fitted Gaussian, not N(0, I)
    # no images at all: nothing to fit, N(0, I) everywhere, and no error
    empty = VAE(16, latent_dim=2, num_classes=1, prior_components=3).eval()
    fit_prior(empty, ImageSet(images[:0], torch.zeros(0, dtype=torch.long), ["a"], []), "cpu")
    assert torch.equal(empty.prior_mix_mean, torch.zeros(1, 3, 2))


def test_one_encoding_of_the_images_fits_priors_of_any_number_of_components():
    from run_vae import ImageSet, encode_posteriors, fit_prior
    torch.manual_seed(3)
    images = (torch.rand(60, 3, 16, 16) * 255).to(torch.uint8)
    data = ImageSet(images, torch.tensor([0, 1] * 30), ["a", "b"], [])
    base = VAE(16, latent_dim=3, num_classes=2).eval()
    posteriors = encode_posteriors(base, data, "cpu", batch_size=7, keep_codes=True)
    assert posteriors.count.tolist() == [30, 30] and torch.cat(posteriors.codes).shape == (60, 3)
    for m in (1, 2, 3):
        direct, reused = (VAE(16, latent_dim=3, num_classes=2, prior_components=m).eval() for _ in range(2))
        direct.load_state_dict(base.state_dict(), strict=False)
        reused.load_state_dict(base.state_dict(), strict=False)
        fit_prior(direct, data, "cpu", batch_size=16)
        fit_prior(reused, None, "cpu", posteriors=posteriors)
        for name, b in direct.prior_state().items():
            assert torch.allclose(reused.prior_state()[name], b, atol=1e-5), (m, name)
    assert not torch.equal(reused.prior_mix_mean[0, 0], reused.prior_mix_mean[0, 1])  # a fitted mixture
    # moments alone cannot fit a mixture: said, not silently left at N(0, I)
    with pytest.raises(ValueError, match="keep_codes=True"):
        fit_prior(reused, None, "cpu", posteriors=encode_posteriors(base, data, "cpu", keep_codes=False))


def test_unconditional_prior_is_one_gaussian_over_all_images():
    from run_vae import ImageSet, fit_prior
    torch.manual_seed(1)
    model = VAE(16, latent_dim=2).eval()
    images = (torch.rand(30, 3, 16, 16) * 255).to(torch.uint8)
    fit_prior(model, ImageSet(images, torch.tensor([0] * 10 + [1] * 20), ["a", "b"], []), "cpu")
    mu, _ = model.encode(images.float() / 255)
    assert model.prior_mean.shape == (1, 2) and torch.allclose(model.prior_mean[0], mu.mean(0), atol=1e-5)


def test_prior_fitted_under_bf16_autocast_matches_float32():
    from run_vae import ImageSet, fit_prior
    torch.manual_seed(2)
    images = (torch.rand(64, 3, 16, 16) * 255).to(torch.uint8)
    data = ImageSet(images, torch.tensor([0, 1] * 32), ["a", "b"], [])
    exact = VAE(16, latent_dim=4, num_classes=2).eval()
    rounded = VAE(16, latent_dim=4, num_classes=2).eval()
    rounded.load_state_dict(exact.state_dict())
    fit_prior(exact, data, "cpu")
    fit_prior(rounded, data, "cpu", amp_dtype=torch.bfloat16)
    spread = exact.prior_scale_tril.diagonal(dim1=1, dim2=2).mean()
    assert torch.allclose(rounded.prior_mean, exact.prior_mean, atol=0.02 * spread)
    assert torch.allclose(rounded.prior_scale_tril, exact.prior_scale_tril, atol=0.02 * spread)
    assert not torch.equal(rounded.prior_mean, exact.prior_mean)  # autocast did run in bf16


@pytest.mark.parametrize("final_conv, layers", [(False, 3), (True, 4)])
def test_decoder_noise_starts_silent_then_adds_learned_random_detail(final_conv, layers):
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, final_conv=final_conv, noise=True).eval()
    noises = [m for m in model.decoder if isinstance(m, run_vae.NoiseInjection)]
    assert len(noises) == layers  # after every doubling to feature maps, none on the pixels
    z = torch.randn(2, 8)
    assert torch.equal(model.decode(z), model.decode(z))  # the weights start at 0: deterministic
    model.decode(z).sum().backward()
    assert all(n.weight.grad.abs().sum() > 0 for n in noises)  # ... and learnable from there
    with torch.no_grad():
        for n in noises:
            n.weight.fill_(1.0)
    assert not torch.equal(model.decode(z), model.decode(z))
    with run_vae.fixed_noise(3):
        a = model.decode(z)
    with run_vae.fixed_noise(3):
        b = model.decode(z)
    assert torch.equal(a, b)


def test_shared_noise_gives_every_image_of_a_batch_the_same_maps_and_ends_with_its_block():
    torch.manual_seed(0)
    model = VAE(16, latent_dim=8, final_conv=True, noise=True).eval()
    for m in model.decoder:
        if isinstance(m, run_vae.NoiseInjection):
            m.weight.data.fill_(1.0)
    z = torch.randn(1, 8).repeat(3, 1)
    with run_vae.shared_noise(model, 5):
        same = model.decode(z)
        assert torch.allclose(model.decode(z[:1]), same[:1], atol=1e-6)  # alone or in a batch
    assert torch.allclose(same[0], same[1], atol=1e-6) and torch.allclose(same[0], same[2], atol=1e-6)
    with run_vae.shared_noise(model, 6):
        assert not torch.allclose(model.decode(z[:1]), same[:1], atol=1e-3)  # another seed, other maps
    apart = model.decode(z)  # outside the block: fresh noise per image again
    assert not torch.allclose(apart[0], apart[1], atol=1e-3)


def test_fixed_noise_leaves_the_global_random_stream_as_it_was():
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    with run_vae.fixed_noise(7):
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)
