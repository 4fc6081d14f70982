"""Generative models: diffusion (DDPM/DDIM, latent), with class guidance, and sample metrics."""
