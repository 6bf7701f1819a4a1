"""Explanations that point at the cause: a pointing benchmark with known artefacts (issue 25).

An artefact of a known kind is inserted at a random position into CIFAR-10 test images
(:mod:`.artefacts`); the monitor judges the original and the artefacted image; on the images
where the artefact made the monitor alarm (and, as a contrast, where it did not) each explanation
method (:mod:`.methods`: the monitor's own explanation, Grad-CAM, Grad-CAM++, the vanilla input
gradient, a random pixel and a random superpixel) is scored by whether its argmax pixel falls
inside the artefact and by the share of its saliency mass there (:mod:`.metrics`, Wilson 95%
intervals). :mod:`.run` drives it; :mod:`.report` writes the JSON and the markdown table.
Run ``python -m bench.explain`` (see bench/README.md).
"""
