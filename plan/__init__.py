"""Seeing a model and its layouts without training it: what a configuration holds and what a parallel
layout needs, on a laptop, for any size.

- `glm-model-info` (plan/info.py): parameter counts by part and convention, training FLOPs per token
  by part, where the layers sit on the pipeline stages, and which optimizer each parameter gets.
- `glm-plan` (plan/cli.py, its arithmetic in plan/planner.py): memory per GPU of every pipeline
  stage under a layout, for every stage of an experiment, an estimate of the step time, and a
  search over the layouts that fit a cluster.

Both build the model on the meta device. They stand above the training loop: they may import
`pretrain/` (its config composition, its DDP settings), which never imports them.
"""
