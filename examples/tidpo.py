"""
Train with TI-DPO the way TRL's `trl dpo` script does; the same code as `trl-tidpo train`.

```bash
python examples/tidpo.py --config examples/recipes/llama31_8b_qlora_ultrafeedback.yaml
accelerate launch --config_file trl_tidpo/accelerate_configs/multi_gpu.yaml examples/tidpo.py --config recipe.yaml
```

Run `python examples/tidpo.py --help` for every flag; see `trl_tidpo/tools/train_script.py` for more commands.
"""

import sys

from trl_tidpo.tools.cli import train_command


if __name__ == "__main__":
    sys.exit(train_command(sys.argv[1:]))  # one-line errors for bad input, as `trl-tidpo train`
