"""``python -m bench.gpu``: the monitor on a GPU, in one prepared run (see ``bench/README.md``).

Sections (each guarded: an error is recorded, the run goes on; each checks the time left):

- ``overhead``: plain eager, plain CUDA graph, monitor eager (``inspect``), monitor CUDA graph,
  the head-only floor, Captum and pytorch-grad-cam, on resnet18 / resnet50 / vgg16 at batch
  1 / 8 / 64 / 256, fp32 and bf16 (autocast + channels-last), interleaved medians; peak extra
  GPU memory; graphed and eager reports compared; half-precision models monitored.
- ``kernels``: ``grad_amap`` (Triton against eager PyTorch, GB/s) and ``percentile_lookup``
  (Triton against the torch path, microseconds).
- ``calibration``: ``calibrate()`` images/s (fp32 and AMP, after warm-up) against plain
  inference, statistics included, 1,000 classes.
- ``profile``: host syncs, copies and kernel launches per monitored call (torch.profiler).

``DEV=cpu`` runs tiny versions on a CPU to check the script itself.
"""
