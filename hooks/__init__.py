"""Module-hook instruments of spectralscope (installed as ``spectralscope.hooks``).

The forward/backward-hook instruments — activation covariance spectra, per-sample gradient spectra and
the directional-sharpness probe — live here; the optimizer-step recorder is ``spectralscope.recorder``.
"""
