"""The sections of ``python -m bench.gpu``: each returns plain data for the JSON report."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from bench.gpu.timing import paired, peak_extra_mib, per_call_us, plain_graph, sync, wall
from surprise_monitor.calibrate.options import RunOptions


@dataclass
class Config:
    """What one run measures: full size on CUDA, tiny on a CPU (``DEV=cpu``)."""

    device: torch.device
    deadline: float

    @property
    def cuda(self) -> bool:
        """True on a GPU."""
        return self.device.type == "cuda"

    @property
    def size(self) -> int:
        """Input height and width."""
        return 224 if self.cuda else 64

    @property
    def classes(self) -> int:
        """Classes of the models and tables."""
        return 1000 if self.cuda else 10

    def left(self) -> float:
        """Seconds left in the run's budget."""
        return self.deadline - time.time()


def build(arch: str, cfg: Config) -> torch.nn.Module:
    """A torchvision model with random weights, in eval mode, on the device."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=cfg.classes)
    return model.eval().to(cfg.device)


def make_table(model: torch.nn.Module, cfg: Config, n: int = 64) -> Any:
    """A table for ``model`` from ``n`` random images (timing does not depend on its values)."""
    from surprise_monitor.calibrate import calibrate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, cfg.size, cfg.size, generator=g)
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    return calibrate(model, TensorDataset(x, y), progress=False, run=RunOptions(batch_size=32))


# ---------------------------------------------------------------------------- overhead
def _peers(model: torch.nn.Module, layer: str) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Captum's LayerGradientXActivation and pytorch-grad-cam's capture, where installed."""
    from surprise_monitor.monitor.probe import get_module

    out: dict[str, Callable[[torch.Tensor], Any]] = {}
    try:
        from captum.attr import LayerGradientXActivation

        lga = LayerGradientXActivation(model, get_module(model, layer))

        def captum(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                pred = model(x).argmax(1)
            return lga.attribute(x, target=pred).mean((2, 3))

        out["captum"] = captum
    except ImportError:
        pass
    try:
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

        twin = copy.deepcopy(model)
        capture = ActivationsAndGradients(twin, [get_module(twin, layer)], None)

        def gradcam(x: torch.Tensor) -> torch.Tensor:
            o = capture(x)
            twin.zero_grad()
            o.gather(1, o.detach().argmax(1)[:, None]).sum().backward(retain_graph=True)
            a = (capture.activations[0] * capture.gradients[0]).mean((2, 3))
            capture.activations, capture.gradients = [], []
            return a

        out["gradcam"] = gradcam
    except ImportError:
        pass
    return out


def _same_reports(a: Any, b: Any) -> dict[str, Any]:
    """Whether two reports agree field for field (max |difference| of the float fields)."""
    diffs = {}
    for name in ("alpha", "percentile", "beta", "beta_percentile"):
        diffs[name] = float((getattr(a, name) - getattr(b, name)).abs().max())
    flags = all(
        torch.equal(getattr(a, n), getattr(b, n))
        for n in ("classes", "surprise", "expectation", "low_beta")
    )
    return {"identical": flags and not any(diffs.values()), "max_abs_diff": diffs}


def overhead_case(
    model: torch.nn.Module,
    table: Any,
    b: int,
    precision: str,
    cfg: Config,
    peers: dict[str, Callable[[torch.Tensor], Any]],
) -> dict[str, Any]:
    """One (model, batch, precision) cell: every variant's median ms and ratios."""
    from surprise_monitor.monitor import SurpriseMonitor
    from surprise_monitor.monitor.options import Execution
    from surprise_monitor.monitor.probe import GradAMapProbe

    bf16 = precision == "bf16"
    x = torch.randn(b, 3, cfg.size, cfg.size, device=cfg.device)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(cfg.device.type, dtype=torch.bfloat16, enabled=bf16)
    eager = SurpriseMonitor(model, table)
    graphed = SurpriseMonitor(model, table, execution=Execution(cuda_graphs=True))
    probe = GradAMapProbe(model, table.layer)
    try:

        def plain() -> None:
            with torch.inference_mode(), amp:
                model(x)

        def under_amp(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with amp:
                    return fn()

            return run

        fns = {
            "plain": plain,
            "floor": under_amp(lambda: probe.run(x)),
            "inspect": under_amp(lambda: eager.inspect(x)),
            "call": under_amp(lambda: eager(x)),
        }
        if cfg.cuda:
            fns["plain_graph"] = plain_graph(model, x, torch.bfloat16 if bf16 else None)
            fns["monitor_graph"] = under_amp(lambda: graphed.inspect(x))
        if not bf16 and b <= 64:
            fns.update({k: (lambda f=f: f(x)) for k, f in peers.items()})
        ms = paired(fns, cfg.device, reps=15 if b <= 64 else 8)
        row: dict[str, Any] = {"ms": ms}
        row["ratio_to_plain"] = {k: round(v / ms["plain"], 3) for k, v in ms.items()}
        if "plain_graph" in ms:
            row["monitor_graph_over_plain_graph"] = round(
                ms["monitor_graph"] / ms["plain_graph"], 3
            )
            graphs = graphed.judge.graphs
            row["graphs"] = {"captures": graphs.captures, "replays": graphs.replays,
                             "disabled": graphs.disabled}  # fmt: skip
            with amp:
                row["graph_vs_eager"] = _same_reports(graphed.inspect(x), eager.inspect(x))
        row["peak_extra_mib"] = {
            k: peak_extra_mib(fns[k], cfg.device)
            for k in ("plain", "inspect", "monitor_graph", "captum", "gradcam")
            if k in fns
        }
        row["failures"] = dict(eager.failures)
        return row
    finally:
        probe.close()
        eager.close()
        graphed.close()


def overhead(cfg: Config) -> dict[str, Any]:
    """Every model x batch x precision cell while the budget lasts."""
    archs = ("resnet50", "vgg16", "resnet18") if cfg.cuda else ("resnet18",)
    batches = (1, 8, 64, 256) if cfg.cuda else (1, 2)
    out: dict[str, Any] = {}
    for arch in archs:
        if cfg.left() < 30:
            out[arch] = "skipped: out of time"
            continue
        model = build(arch, cfg)
        table = make_table(model, cfg)
        peers = _peers(model, table.layer)  # before any monitor hook: grad-cam deep-copies
        cells: dict[str, Any] = {"layer": table.layer}
        for precision in ("fp32", "bf16"):
            for b in batches:
                if cfg.left() < 20:
                    cells[f"{precision} b{b}"] = "skipped: out of time"
                    continue
                try:
                    cells[f"{precision} b{b}"] = overhead_case(
                        model, table, b, precision, cfg, peers
                    )
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    cells[f"{precision} b{b}"] = f"error: {type(exc).__name__}: {exc}"
                print(arch, precision, b, cells[f"{precision} b{b}"], flush=True)
        out[arch] = cells
        del model
        if cfg.cuda:
            torch.cuda.empty_cache()
    return out


def half_models(cfg: Config) -> dict[str, Any]:
    """``SurpriseMonitor`` on fp16 / bf16 models (the model itself in half precision)."""
    from surprise_monitor.monitor import SurpriseMonitor
    from surprise_monitor.monitor.options import Execution

    out: dict[str, Any] = {}
    arch = "resnet18"
    for dtype in (torch.float16, torch.bfloat16):
        if dtype == torch.float16 and not cfg.cuda:
            continue  # fp16 convolutions are slow or missing on CPUs
        name = str(dtype).replace("torch.", "")
        try:
            model = build(arch, cfg)
            table = make_table(model, cfg, n=32)
            model = model.to(dtype)
            x = torch.randn(4, 3, cfg.size, cfg.size, device=cfg.device, dtype=dtype)
            for graphs in (False, True):
                run = Execution(cuda_graphs=graphs and cfg.cuda, check_fingerprint=False)
                with SurpriseMonitor(model, table, execution=run) as mon:
                    reports = [mon.inspect(x) for _ in range(3)]
                    out[f"{name} graphs={graphs}"] = {
                        "alpha_finite": bool(torch.isfinite(reports[-1].alpha).all()),
                        "flagged": int(reports[-1].flagged.sum()),
                    }
        except Exception as exc:  # noqa: BLE001 - recorded
            out[name] = f"error: {type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------- kernels
def kernels(cfg: Config) -> dict[str, Any]:
    """grad_amap (Triton vs eager, GB/s) and percentile_lookup (Triton vs torch, us)."""
    from surprise_monitor.kernels import grad_amap

    shapes = [(8, 512, 7), (8, 2048, 7), (32, 512, 14), (32, 2048, 14), (1, 2048, 7)]
    if not cfg.cuda:
        shapes = [(2, 64, 7)]
    amap: dict[str, Any] = {}
    for b, n, side in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                a = torch.randn(b, n, side, side, device=cfg.device, dtype=dtype)
                g = torch.randn_like(a)
                if layout == "channels_last":
                    a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
                nbytes = 2 * a.numel() * a.element_size() + b * n * 4
                eager = per_call_us(lambda a=a, g=g: (a.float() * g.float()).mean((2, 3)),
                                    cfg.device)  # fmt: skip
                row = {"eager_us": eager, "eager_GBps": round(nbytes / eager / 1e3, 1)}
                if cfg.cuda:
                    tri = per_call_us(
                        lambda a=a, g=g: grad_amap(a, g, backend="triton"), cfg.device
                    )
                    row.update(triton_us=tri, triton_GBps=round(nbytes / tri / 1e3, 1),
                               triton_over_eager=round(tri / eager, 3))  # fmt: skip
                    err = (grad_amap(a, g) - (a.float() * g.float()).mean((2, 3))).abs().max()
                    row["max_abs_err"] = float(err)
                amap[f"B={b} N={n} HW={side * side} {str(dtype)[6:]} {layout}"] = row
    return {"grad_amap": amap, "percentile_lookup": _lookup_kernel(cfg)}


def _lookup_table(n: int, k: int, device: torch.device) -> Any:
    """A prepared K x N x Q table with counts and a 1001-level beta grid."""
    from surprise_monitor.kernels import prepare_lookup_table
    from surprise_monitor.monitor.table import DEFAULT_BETA_LEVELS, DEFAULT_LEVELS

    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor(DEFAULT_LEVELS)  # Q = 29
    q = len(levels)
    raw = SimpleNamespace(
        levels=levels, quantiles=torch.rand(k, n, q, generator=gen).cumsum_(-1),
        mean=torch.randn(k, n, generator=gen), counts=torch.full((k,), 10),
        beta_levels=torch.tensor(DEFAULT_BETA_LEVELS),
        beta_quantiles=torch.randn(k, len(DEFAULT_BETA_LEVELS), generator=gen).sort(-1).values,
    )  # fmt: skip
    return prepare_lookup_table(raw, device=device)


def _lookup_kernel(cfg: Config) -> dict[str, Any]:
    """Microseconds per lookup (fused: percentiles, flags, beta, its rank, low beta)."""
    from surprise_monitor.kernels.lookup_torch import percentile_lookup_torch

    out: dict[str, Any] = {}
    k, q = (1000, 29) if cfg.cuda else (10, 29)
    for n in (512, 2048) if cfg.cuda else (64,):
        table = _lookup_table(n, k, cfg.device)
        for b in (1, 8, 32):
            gen = torch.Generator().manual_seed(1)
            alpha = (torch.randn(b, n, generator=gen) * 4).to(cfg.device)
            cls = torch.randint(0, k, (b,), generator=gen).to(cfg.device)
            args = (alpha, cls, table)
            row = {"torch_us": per_call_us(lambda a=args: percentile_lookup_torch(*a), cfg.device)}
            if cfg.cuda:
                from surprise_monitor.kernels.lookup_triton import percentile_lookup_triton

                row["triton_us"] = per_call_us(
                    lambda a=args: percentile_lookup_triton(*a), cfg.device
                )
                row["triton_over_torch"] = round(row["triton_us"] / row["torch_us"], 3)
            out[f"B={b} N={n} K={k} Q={q}"] = row
    return out


# ------------------------------------------------------------------------- calibration
def calibration(cfg: Config) -> dict[str, Any]:
    """calibrate() images/s against plain inference (statistics included), after warm-up."""
    from surprise_monitor.calibrate import accumulators, calibrate

    arch = "resnet50" if cfg.cuda else "resnet18"
    n, bs = (4096, 128) if cfg.cuda else (48, 16)
    model = build(arch, cfg)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, cfg.size, cfg.size, generator=g),
                         torch.arange(n) % cfg.classes)  # fmt: skip
    warm = torch.utils.data.Subset(data, range(2 * bs))

    def plain(ds: Any = data) -> None:
        for x, _ in DataLoader(ds, batch_size=bs, pin_memory=cfg.cuda):
            with torch.inference_mode():
                model(x.to(cfg.device, non_blocking=True))

    spent: list[float] = []
    real = accumulators.SpillAccumulator.statistics

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    accumulators.SpillAccumulator.statistics = timed  # type: ignore[method-assign]
    try:
        plain(warm)
        for amp in (False, True):  # cuDNN picks its kernels for both precisions first
            calibrate(
                model, DataLoader(warm, batch_size=bs), progress=False, run=RunOptions(amp=amp)
            )
        out: dict[str, Any] = {"arch": arch, "images": n, "batch": bs, "classes": cfg.classes}
        out["plain_img_s"] = round(n / wall(plain, cfg.device), 1)
        for amp in (False, True):
            spent.clear()
            loader = DataLoader(data, batch_size=bs, pin_memory=cfg.cuda)
            run = RunOptions(amp=amp)
            t = wall(lambda ld=loader, r=run: calibrate(model, ld, progress=False, run=r),
                     cfg.device)  # fmt: skip
            key = "amp" if amp else "fp32"
            out[f"calibrate_{key}_img_s"] = round(n / t, 1)
            out[f"calibrate_{key}_ratio"] = round((n / t) / out["plain_img_s"], 3)
            out[f"statistics_{key}_s"] = round(sum(spent), 3)
        return out
    finally:
        accumulators.SpillAccumulator.statistics = real  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- profile
def profile(cfg: Config) -> dict[str, Any]:
    """Syncs, copies and launches per monitored call, eager and graphed (resnet50 b8)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from surprise_monitor.monitor import SurpriseMonitor
    from surprise_monitor.monitor.options import Execution

    model = build("resnet50" if cfg.cuda else "resnet18", cfg)
    table = make_table(model, cfg)
    x = torch.randn(8 if cfg.cuda else 2, 3, cfg.size, cfg.size, device=cfg.device)
    keys = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel",
            "cudaGraphLaunch", "aten::item", "aten::_local_scalar_dense")  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.cuda else [])
    out: dict[str, Any] = {}
    for graphs in (False, True) if cfg.cuda else (False,):
        with SurpriseMonitor(model, table, execution=Execution(cuda_graphs=graphs)) as mon:
            for _ in range(4):
                mon.inspect(x)
            sync(cfg.device)
            with torch_profile(activities=activities) as prof:
                for _ in range(10):
                    mon.inspect(x)
                sync(cfg.device)
            counts = {e.key: e.count / 10 for e in prof.key_averages() if e.key in keys}
            out["graph" if graphs else "eager"] = counts
    return out
