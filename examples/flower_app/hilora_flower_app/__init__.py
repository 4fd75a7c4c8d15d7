"""The HiLoRA Flower App: thin wrappers around :mod:`hilora_lightning.flower`."""
