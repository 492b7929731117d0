"""The demo's settings (:class:`DemoConfig`), the paper's numbers it compares with, and the note on its eps."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..train.tables import PAPER_EPS

__all__ = ["DemoConfig", "PAPER", "PAPER_EPS", "EPS_NOTE", "eps_note", "CIFAR_DIM", "CIFAR_MEAN_L2"]

#: The paper's numbers (ResNet-18, CIFAR-100 for Table 1/2; Table 3 as printed; times on a GTX 1080 Ti).
PAPER = {
    "table1": {  # grad, hess, curvature, accuracy (%)
        "standard": (19.66, 6061.96, 270.89, 77.42), "lcnn": (22.04, 1143.62, 69.50, 77.30),
        "gradreg": (8.86, 776.56, 89.47, 77.20), "lcnn+gradreg": (9.87, 154.36, 25.30, 77.29),
        "cure": (8.86, 979.45, 116.31, 76.48), "softplus+wd": (18.08, 1052.84, 70.39, 77.44),
        "adversarial": (7.99, 501.43, 63.79, 76.96),
    },
    "table2": {  # clean, 0.05, 0.1, 0.15, 0.2 (%)
        "standard": (77.42, 59.97, 37.55, 23.41, 16.11), "lcnn": (77.16, 61.17, 39.72, 25.60, 17.66),
        "gradreg": (77.20, 71.90, 61.06, 49.19, 38.09), "lcnn+gradreg": (77.29, 72.68, 63.36, 52.96, 42.70),
        "cure": (76.48, 71.39, 61.28, 49.60, 39.04), "softplus+wd": (77.44, 60.86, 38.04, 23.85, 16.20),
        "adversarial": (76.96, 72.76, 64.70, 54.80, 44.98),
    },
    "table3": {  # grad, hess, curvature
        "standard": (11.75, 12.28, 0.025), "gradreg": (11.33, 11.22, 0.017), "lcnn": (19.99, 11.33, 0.129),
        "lcnn+gradreg": (21.82, 10.43, 0.146),
    },
    "seconds_per_epoch": {"standard": 100, "softplus+wd": 100, "lcnn": 160, "gradreg": 270, "lcnn+gradreg": 350,
                          "cure": 500, "adversarial": 500},
    "curvature_ratio": {"lcnn": 270.89 / 69.50, "lcnn+gradreg": 270.89 / 25.30},
}


CIFAR_DIM = 3 * 32 * 32
CIFAR_MEAN_L2 = 29.0  # approx. mean ||x||_2 of a CIFAR image in [0, 1]^3072 (pixel RMS ~0.52)

EPS_NOTE = (
    "eps is the l2 radius on images in [0, 1], exactly as in the paper, but the paper's images are CIFAR "
    "3x32x32 (d = 3072) and these are 1x{s}x{s} digits (d = {d}). The same l2 radius spread over fewer pixels "
    "is a larger per-pixel change: the RMS change per pixel is eps/sqrt(d) = eps/{sq:.3g} here vs eps/55.4 on "
    "CIFAR, i.e. {f:.2f}x larger (eps = 0.2: {pp:.4f} = {pp255:.1f}/255 per pixel here, 0.0036 = 0.92/255 on "
    "CIFAR); relative to the image norm (mean ||x||_2 = {xn:.2f} here, ~29 on CIFAR) eps is {g:.1f}x larger. "
    "The CIFAR-equivalent per-pixel strength of the paper's eps = 0.05 ... 0.2 would be eps = {e1:.3f} ... "
    "{e4:.3f} here. So the paper's four eps are *stronger* attacks on these images than on CIFAR, yet digits have "
    "wide margins (an easy 10-class problem), so accuracies fall less; eps = 0.5 is added to separate the "
    "methods.")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class DemoConfig:
    """Every setting of the demo (all recorded in results.json)."""

    seeds: int = 3
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.1
    image_size: int = 8
    width: int = 16
    max_train: int | None = None  # train on the first N training images (None: all 1347)
    n_geometry: int = 300  # test samples for Hessians (and as many train samples for Table 3)
    lanczos_iters: int = 20
    n_pgd: int = 450  # all test images
    pgd_steps: int = 10
    eps: tuple[float, ...] = PAPER_EPS
    extra_eps: tuple[float, ...] = (0.5,)
    noise_norms: tuple[float, ...] = (1e-3, 2.15e-3, 4.64e-3, 1e-2, 2.15e-2, 4.64e-2, 1e-1)
    n_gradrob: int = 200
    moons_n: int = 500
    moons_noise: float = 0.25
    moons_epochs: int = 150
    moons_width: int = 64
    moons_grid: int = 200
    methods: tuple[str, ...] = ("standard", "lcnn", "gradreg", "lcnn+gradreg", "cure", "softplus+wd",
                                "adversarial")
    #: extra ``fit`` arguments per method (deviations from lcnnify.train's defaults; recorded and reported)
    method_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"cure": {"cure_weight": 0.01}})
    workers: int = 2
    timing_rounds: int = 5  # interleaved timing of one training step per method (A B C ... A B C ...)
    timing_steps: int = 5
    #: the "pretrained model" part: per seed, the trained standard model's weights in the base (ReLU) model,
    #: converted with ``preserve_function=True`` and fine-tuned into an LCNN (``fit(recipe="finetune")``)
    pretrained: bool = True
    finetune_epochs: int = 4
    n_example: int = 256  # training images for the function-preserving conversion
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "DemoConfig":
        """A tiny version for the test suite (seconds, not minutes): same code paths, numbers meaningless."""
        base = cls(seeds=2, epochs=1, max_train=192, n_geometry=16, lanczos_iters=5, n_pgd=16, pgd_steps=2,
                   noise_norms=(1e-3, 1e-2, 1e-1), n_gradrob=16, moons_n=120, moons_epochs=2, moons_width=16,
                   moons_grid=40, workers=1, timing_rounds=2, timing_steps=1, finetune_epochs=1,
                   quick=True)
        return replace(base, **overrides)



def eps_note(cfg: DemoConfig, mean_l2: float) -> str:
    d = cfg.image_size ** 2
    sq = math.sqrt(d)
    f = math.sqrt(CIFAR_DIM / d)
    pp = 0.2 / sq
    return EPS_NOTE.format(s=cfg.image_size, d=d, sq=sq, f=f, pp=pp, pp255=pp * 255, xn=mean_l2,
                           g=CIFAR_MEAN_L2 / mean_l2, e1=0.05 / f, e4=0.2 / f)

