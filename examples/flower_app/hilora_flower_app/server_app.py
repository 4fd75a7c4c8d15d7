"""ServerApp: reads the experiment YAML named by the run config and runs HiLoRA's loop over the Grid."""

from pathlib import Path

from hilora_lightning.flower import make_server_app

# cfg=None: config, overrides, out-dir, resume and min-nodes come from [tool.flwr.app.config]
app = make_server_app(config_root=Path(__file__).resolve().parents[1])
