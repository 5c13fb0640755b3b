"""The GLM-4.5 model family on Megatron-Core."""

import warnings


def quiet_megatron_warnings() -> None:
    for text in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                 "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{text}.*")
