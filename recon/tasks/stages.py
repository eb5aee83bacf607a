"""The stages of a task example run (``OUT/stages.pt``): finished rows kept on disk, the resume
rule for them, and the digest of the task network they were computed with."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict

import torch

from ..checkpoint import check_resume, load_checkpoint, plain_state, save_checkpoint

__all__ = ["Stages", "network_digest", "OPTIONAL_ROW_SETTINGS"]


def network_digest(network: torch.nn.Module) -> str:
    """SHA-256 of a network's weights and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in network.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: settings of optional rows, with the text of the stage names they affect: a file without
#: such stages (also one from before the setting existed) resumes under any value of it
OPTIONAL_ROW_SETTINGS = {"adaptive_iters": "Adaptive TV (", "adaptive_images": "Adaptive TV (",
                         "adaptive_epochs": "Adaptive TV ("}


class Stages:
    """The finished stages (rows) of an example run in ``OUT/stages.pt``, written atomically
    after each one; reopened with other settings it refuses (the resume rule of
    :func:`recon.checkpoint.check_resume`), with ``restart`` it starts empty."""

    def __init__(self, path: Path, settings: Dict[str, Any], restart: bool):
        self.path, self.settings, self.done = Path(path), plain_state(settings), {}
        self._saved: Dict[str, Any] = {}
        if self.path.is_file() and not restart:
            state = load_checkpoint(self.path)
            self._saved = dict(state.get("settings") or {})
            self.done = dict(state.get("done") or {})
            for key, marker in OPTIONAL_ROW_SETTINGS.items():  # settings of rows not computed yet
                if not any(marker in name for name in self.done):
                    self._saved[key] = self.settings.get(key)
            check_resume(self.path, self._saved, self.settings, ignore=["network_sha256"],
                         hint="use the saved settings, another --out, or --restart")
        self.reused = len(self.done)

    def bind_network(self, digest: str) -> None:
        """Record the SHA-256 of ``T*`` (:func:`network_digest`); finished stages of another
        ``T*`` are refused like other settings."""
        if self.done:
            check_resume(self.path, {"network_sha256": self._saved.get("network_sha256")},
                         {"network_sha256": digest},
                         hint="the rows were computed with another T*: use its checkpoint, "
                              "another --out, or --restart")
        self.settings["network_sha256"] = digest

    @staticmethod
    def prefix(sigma: float, seed: int = 0) -> str:
        """``"sigma 0.3: "`` (seed 0) or ``"seed 2, sigma 0.3: "``: how a stage name starts."""
        return f"sigma {sigma:g}: " if seed == 0 else f"seed {seed}, sigma {sigma:g}: "

    def of(self, sigma: float, seed: int = 0) -> Dict[str, Any]:
        """The finished stages of noise level ``sigma`` and seed ``seed`` by route."""
        prefix = self.prefix(sigma, seed)
        return {k[len(prefix):]: v for k, v in self.done.items() if k.startswith(prefix)}

    def add(self, sigma: float, route: str, stage: Dict[str, Any], seed: int = 0) -> str:
        """Record a finished stage (and write the file); returns its name."""
        name = self.prefix(sigma, seed) + route
        self.done[name] = stage
        save_checkpoint({"settings": self.settings, "done": self.done}, self.path)
        return name
