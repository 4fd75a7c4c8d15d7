"""ClientApp: a HiLoRAViT + Lightning Trainer per SuperNode; the node's partition-id picks its client."""

from pathlib import Path

from hilora_lightning.flower import make_client_app

# cfg=None: the experiment YAML named by the run config is read on the first message
app = make_client_app(config_root=Path(__file__).resolve().parents[1])
