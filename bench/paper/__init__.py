"""The paper's experiments (Hartley et al., Sections 4.1-4.4) on small CNNs trained on CIFAR-10.

Run everything and write ``bench/paper/REPORT.md`` with its figures: ``python -m bench.paper``.
Each experiment is also a script of its own (``python -m bench.paper.ranking`` and so on); see
``bench/paper/README.md``.
"""
