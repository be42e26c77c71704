"""DSA hyper-parameters (reference ParamDiffAug) and strategy-string parsing."""
from dataclasses import dataclass

OP_NAMES = ("color", "crop", "cutout", "flip", "scale", "rotate")
STRATEGY_DEFAULT = "color_crop_cutout_flip_scale_rotate"
AUG_MODES = ("S", "M")


@dataclass
class ParamDiffAug:
    aug_mode: str = "S"  # 'S': one op group per call (per group when siamese); 'M': every op in order
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    ratio_noise: float = 0.05  # present in the reference, used by none of its ops
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Op names in strategy order (duplicates kept: they weight the choice as in the reference)."""
    if strategy is None or strategy in ("", "none", "None"):
        return ()
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str like {STRATEGY_DEFAULT!r}, got {type(strategy).__name__}")
    names = tuple(strategy.split("_"))
    unknown = [name for name in names if name not in OP_NAMES]
    if unknown:
        raise ValueError(
            f"strategy {strategy!r} has unknown op(s) {unknown}; valid names: {', '.join(OP_NAMES)} "
            "(joined by '_'), or 'none'"
        )
    return names


def check_param(param) -> None:
    """Duck-typed: the reference's own ParamDiffAug object is accepted too."""
    missing = [f for f in ParamDiffAug.__dataclass_fields__ if f != "ratio_noise" and not hasattr(param, f)]
    if missing:
        raise TypeError(f"param lacks ParamDiffAug field(s) {missing}")
    if param.aug_mode not in AUG_MODES:
        raise ValueError(f"param.aug_mode must be one of {AUG_MODES}, got {param.aug_mode!r}")
