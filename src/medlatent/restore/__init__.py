"""Restoration of degraded acquisitions: denoising, undersampled k-space, inpainting."""
