"""Trans-LoRA migration (arXiv 2405.17258): carry an adapter to a new base model without its
training data.

The pipeline reads top-down, one small module per step, each a function on plain data that talks
to models only through the :class:`~vllm_lora_ext.evaluation.backends.Backend` protocol (a vLLM
server over HTTP, or transformers in process):

``synthesis`` (the old base writes new task inputs from a few real ones) -> ``discriminator``
(a LoRA on the old base keeps those that look real) -> ``labelling`` (the old base + old adapter,
the teacher, answers them) -> ``distill`` (a new LoRA on the new base learns the answers) ->
``gate`` (the new adapter is checked against the teacher on held-out inputs). ``migrator`` runs
the steps as one resumable, cancellable job with a checkpoint per step: each step's typed output
(``checkpoints``), written as JSON and validated back on resume. Nothing here imports vLLM or
FastAPI.
"""
