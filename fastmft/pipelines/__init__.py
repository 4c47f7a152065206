"""The pipelines layer: orchestration without argparse (typicality scoring, the trainer, task
selection) and their figures."""
