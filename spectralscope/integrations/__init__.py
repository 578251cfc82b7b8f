"""Callbacks that start and stop `watch` inside the training frameworks people use: the HF ``Trainer``
(`spectralscope.integrations.transformers`) and Lightning (`spectralscope.integrations.lightning`). Each imports
its framework only when used."""
