"""DVC's view of the config: params.yaml, composed from conf/ exactly as `dvc exp run -S` composes it.

`dvc repro` reads the committed params.yaml; `dvc exp run -S key=value` recomposes conf/ into it
(DVC's Hydra integration, .dvc/config). Both must agree, so this uses DVC's own composition.

    python -m vaelab.params [override ...]      # rewrite params.yaml (what `make params` runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

from vaelab import paths


def compose_params(overrides: list[str], output: Path | None = None) -> Path:
    from dvc.utils.hydra import compose_and_dump

    root = paths.project_root()
    output = output or root / "params.yaml"
    compose_and_dump(output, str(root / "conf"), None, "train", str(root / ".dvc"), overrides)
    return output


if __name__ == "__main__":
    print(f"wrote {compose_params(sys.argv[1:])}")
