"""Stages ``tune@<method>`` and ``train@<method>``: fit one method on frozen features.

``tune`` reads ``data/features/{train,val}`` and ``params.yaml:tune``; writes ``tuned/<method>.json``
(the chosen hyper-parameters, scored on val only). Entry: :func:`crossalign.train.tuning.run`.
``train`` reads ``data/features/{train,val}``, ``tuned/<method>.json`` and ``params.yaml:train``;
writes ``models/<method>/`` (``final/seed-<s>/model.safetensors`` + ``model.json``, the resumable
``checkpoints/``) and the training curves. Entry: :func:`crossalign.train.stage.run`.
``batches`` places the split and draws batches, ``checkpoint`` saves/resumes atomically, ``optim``
builds the parameter groups, ``tracker`` logs each run to MLflow.
"""
