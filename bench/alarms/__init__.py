"""The per-input alarm on two strong CIFAR-10 models: score selection, baselines, alarm rates.

``python -m bench.alarms`` (see ``bench/alarms/PROTOCOL.md`` for the splits and how the default
score was chosen, and ``bench/README.md`` for the last figures).
"""
