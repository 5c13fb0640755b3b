"""glm-convert: checkpoints to and from Hugging Face `glm4_moe` directories, one tensor at a time.

- convert/cli.py: the command line (`glm-convert export|import`).
- convert/export.py: a dist checkpoint of any layout -> a Hugging Face directory.
- convert/importer.py: a Hugging Face directory -> a weights-only checkpoint in a new run directory.
- convert/hf_dir.py: Hugging Face directories, read (checked whole first) and written (streamed shards).
- convert/staging.py: output written beside its final name and moved into place when complete.

The names of the tensors on both sides live in one table, model/hf_mapping.py; reading and writing
dist checkpoints is the training loop's (pretrain/checkpoint.py, pretrain/checkpoint_io.py). This
package stands above the loop: it may import `pretrain/`, which never imports it.
"""
