"""Synthetic demonstration datasets, so the pipeline runs end to end without downloading data: ``atlas``
(``make_atlas_like``, chronic-stroke T1w MRI) and ``ctp`` (``make_ctp_like``, acute-stroke CT perfusion)."""
