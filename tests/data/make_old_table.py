"""Makes ``old_table.safetensors``, ``old_model.safetensors`` and ``old_results.json`` with the
code of commit 30882bc (before the package was named ``surprise_monitor``), so a test can check
that a table written then loads now and judges the same inputs the same way.

Run against that commit (its top-level packages are ``monitor``, ``kernels``, ``calibrate``)::

    git worktree add /tmp/old-30882bc 30882bc
    cd /tmp/old-30882bc && PYTHONPATH=. python /path/to/tests/data/make_old_table.py \\
        /path/to/tests/data
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from calibrate import calibrate  # the old top-level package
from monitor import SurpriseMonitor
from tests._models import TinyCNN, class_images, seeded

out = Path(sys.argv[1])
torch.manual_seed(0)
model = seeded(TinyCNN(num_classes=3))
images, labels = class_images(700, 3, seed=1)
train = torch.utils.data.TensorDataset(images[:400], labels[:400])
heldout = torch.utils.data.TensorDataset(images[400:], labels[400:])
table = calibrate(model, train, heldout=heldout, batch_size=50, progress=False, top_k=2)
table.save(out / "old_table.safetensors")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "old_model.safetensors")
x, y = class_images(6, 3, seed=5)
with SurpriseMonitor(model, table) as monitor:
    predicted = monitor.inspect(x)
    labelled = monitor.inspect(x, y)
results = {
    name: {
        "alpha": r.alpha.tolist(),
        "percentile": r.percentile.tolist(),
        "beta": r.beta.tolist(),
        "score": r.score.tolist(),
        "p_value": r.p_value.tolist(),
        "alarm": r.alarm.tolist(),
        "classes": r.classes.tolist(),
    }
    for name, r in (("predicted", predicted), ("labelled", labelled))
}
results["inputs"] = {"images": x.tolist(), "labels": y.tolist()}
(out / "old_results.json").write_text(json.dumps(results))
print("wrote", sorted(p.name for p in out.iterdir()))
