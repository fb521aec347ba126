"""Training entry points of the embedded digits model and its evaluator (not imported by the library).

    python -m lowbitdm_cli.training.digits_unet --steps 3000
    python -m lowbitdm_cli.training.digits_classifier

Both write into ``lowbitdm_cli/models/weights`` unless given ``--out``.
"""
