"""The Hydra config tree (model/, parallel/, data/, optim/, experiment/), shipped as package data so
that an installed glm-pretrain finds it."""
