"""LoRA fine-tuning end to end: ``python -m llmopt_ext.finetune`` (see :mod:`.cli`).

Submodules: :mod:`.data` (embedded task, Alpaca loading, masking), :mod:`.pretrain` (the
embedded base model), :mod:`.train` (the loop), :mod:`.cli`. Nothing heavy is imported here.
"""
