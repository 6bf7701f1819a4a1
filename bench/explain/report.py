"""The pointing benchmark's JSON and markdown table."""

from __future__ import annotations

import json
from pathlib import Path


def _hits(cell: dict) -> str:
    """``k/n (low-high%)`` for one rate."""
    if not cell["n"]:
        return "-"
    return f"{cell['hits']}/{cell['n']} ({100 * cell['low']:.0f}-{100 * cell['high']:.0f}%)"


def table(results: dict, group: str = "alarmed") -> str:
    """The markdown table of one group (``alarmed`` or ``not_alarmed``) of every artefact kind."""
    head = (
        "| artefact (images alarmed / eligible) | monitor top region overlaps | monitor no region "
        "| monitor pointing | Grad-CAM pointing | Grad-CAM++ pointing | gradient pointing "
        "| random pixel | random superpixel "
        "| mass inside: monitor / Grad-CAM / Grad-CAM++ / gradient |"
    )
    lines = [head, "|" + "---|" * 10]
    for kind, k in results["kinds"].items():
        g = k[group]
        if not g["n"]:
            lines.append(f"| {kind} (0 / {k['original_not_alarmed']}) |" + " - |" * 9)
            continue
        mass = " / ".join(
            f"{100 * g[f'{m}_mass']:.0f}%" for m in ("monitor", "gradcam", "gradcam++", "gradient")
        )
        lines.append(
            f"| {kind} ({g['n']} / {k['original_not_alarmed']}) "
            f"| {_hits(g['monitor_region_overlaps'])} | {g['monitor_no_region']['hits']} "
            f"| {_hits(g['monitor_hit'])} | {_hits(g['gradcam_hit'])} "
            f"| {_hits(g['gradcam++_hit'])} "
            f"| {_hits(g['gradient_hit'])} | {100 * g['random_pixel']:.1f}% "
            f"| {100 * g['random_superpixel']:.1f}% | {mass} |"
        )
    return "\n".join(lines)


def region_table(results: dict, group: str = "alarmed") -> str:
    """Region-level pointing: whether each method's top superpixel (the monitor's explanation's
    SLIC segments, each scored by the method's saliency mass) touches the artefact."""
    names = (("monitor", "monitor"), ("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"),
             ("gradient", "gradient"))  # fmt: skip
    head = (
        "| artefact (images) | "
        + " | ".join(f"{title} top region overlaps" for _, title in names)
        + " | random superpixel |"
    )
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for kind, k in results["kinds"].items():
        g = k[group]
        if not g["n"] or "gradcam_region_overlaps" not in g:
            lines.append(f"| {kind} ({g['n']}) |" + " - |" * (len(names) + 1))
            continue
        cells = " | ".join(_hits(g[f"{m}_region_overlaps"]) for m, _ in names)
        lines.append(f"| {kind} ({g['n']}) | {cells} | {100 * g['random_superpixel']:.1f}% |")
    return "\n".join(lines)


MODEL_NAMES = {"resnet18": "ResNet-18", "vgg_bn": "VGG-BN", "vgg_plain": "VGG (no BN)",
               "mobilenet": "MobileNet"}  # fmt: skip


def markdown(results: dict) -> str:
    """Both tables with a header line on the run."""
    return (
        f"{MODEL_NAMES.get(results['model'], results['model'])}, {results['images_per_kind']} "
        f"test images per artefact kind from test image "
        f"{results['first_test_image']:,} on ({results['original_alarms']} originals alarmed and "
        f"were left out); alarm rate {results['alarm_rate']:.0%}; {results['seconds']:.0f} s.\n\n"
        f"On the images the artefact made alarm:\n\n{table(results)}\n\n"
        f"Region-level pointing on the same images (each method's top superpixel among the "
        f"monitor's SLIC segments):\n\n{region_table(results)}\n\n"
        f"Contrast: up to {results['contrast_per_kind']} images per kind where it did not:\n\n"
        f"{table(results, 'not_alarmed')}\n"
    )


def write(results: dict, out: Path) -> None:
    """``out`` (JSON) and the markdown beside it (``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
