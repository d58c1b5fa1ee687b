"""Regenerates tests/data/encoders_vae_golden/: a tiny diffusers AutoencoderKL (seeded random weights, saved with
diffusers' own save_pretrained) plus its moments and decoded image for a fixed input, computed by diffusers.
test_encoders.py checks that encoders.load_vae reproduces them. Needs diffusers (not a project dependency):

    pip install --target /tmp/dpkgs diffusers regex requests importlib_metadata
    PYTHONPATH=/tmp/dpkgs python tests/data/encoders_make_vae_golden.py
"""
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoders_vae_golden")
torch.manual_seed(0)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                    latent_channels=4, norm_num_groups=4, sample_size=16).eval()
with torch.no_grad():  # perturb every tensor (norm affine, biases) so no parameter is a trivial 1 or 0
    for p in vae.parameters():
        p.add_(0.05 * torch.randn_like(p))
vae.save_pretrained(OUT)  # config.json + diffusion_pytorch_model.safetensors
x = torch.rand(2, 3, 16, 16) * 2 - 1
z = torch.randn(2, 4, 8, 8)
with torch.no_grad():
    post = vae.encode(x).latent_dist
    dec = vae.decode(z).sample
save_file({"x": x, "mean": post.mean.contiguous(), "std": post.std.contiguous(), "z": z, "decoded": dec.contiguous()},
          os.path.join(OUT, "io.safetensors"))
print("wrote", OUT)
