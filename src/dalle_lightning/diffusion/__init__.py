"""Diffusion pieces shared by the prior, decoder and upsampler: schedules, samplers, guidance."""
