"""The model architectures an agent can run: a registry, configured by JSON.

No code crosses the network: a job names an architecture from this registry and ships weights in
safetensors. Shapes are computed here in pure Python so the marketplace can validate weights without
torch; `build` imports torch and is only called in the agent's compute child.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_PARAMETERS = 50_000_000


class ArchitectureError(ValueError):
    """A model spec names an unknown architecture or carries a bad config."""


@dataclass(frozen=True)
class Architecture:
    name: str
    normalise: Callable[[dict[str, Any]], dict[str, Any]]
    param_shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]
    input_shape: Callable[[dict[str, Any]], tuple[int, ...]]
    output_dim: Callable[[dict[str, Any]], int]
    build: Callable[[dict[str, Any]], Any]


def _int(config: dict[str, Any], key: str, *, default: int | None = None, low: int = 1, high: int = 65_536) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchitectureError(f"config.{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ArchitectureError(f"config.{key} must be between {low} and {high}, got {value}")
    return value


def _int_list(config: dict[str, Any], key: str, *, min_len: int, default: list[int] | None = None) -> list[int]:
    value = config.get(key, default)
    if not isinstance(value, list) or len(value) < min_len or len(value) > 16:
        raise ArchitectureError(f"config.{key} must be a list of {min_len} to 16 integers, got {value!r}")
    return [_int({key: v}, key) for v in value]


def _reject_unknown(config: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ArchitectureError(f"unknown config keys: {', '.join(unknown)}")


# --- MLP ------------------------------------------------------------------------------------------

def _mlp_normalise(config: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown(config, {"in_features", "hidden", "out_features"})
    return {
        "in_features": _int(config, "in_features"),
        "hidden": _int_list(config, "hidden", min_len=0, default=[]),
        "out_features": _int(config, "out_features"),
    }


def _mlp_widths(config: dict[str, Any]) -> list[int]:
    return [config["in_features"], *config["hidden"], config["out_features"]]


def _mlp_param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    widths = _mlp_widths(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        index = 2 * layer  # Linear, ReLU, Linear, ... in one Sequential
        shapes[f"net.{index}.weight"] = (fan_out, fan_in)
        shapes[f"net.{index}.bias"] = (fan_out,)
    return shapes


def _mlp_build(config: dict[str, Any]) -> Any:
    from torch import nn

    widths = _mlp_widths(config)
    layers: list[Any] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*layers[:-1])  # no activation after the last layer: logits

        def forward(self, x: Any) -> Any:
            return self.net(x)

    return MLP()


# --- small CNN ------------------------------------------------------------------------------------

def _cnn_normalise(config: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown(config, {"in_channels", "height", "width", "channels", "kernel_size", "hidden", "out_features"})
    normal: dict[str, Any] = {  # ints and a list of ints: a config, as every architecture's is typed
        "in_channels": _int(config, "in_channels", default=1, high=64),
        "height": _int(config, "height", high=1024),
        "width": _int(config, "width", high=1024),
        "channels": _int_list(config, "channels", min_len=1),
        "kernel_size": _int(config, "kernel_size", default=3, high=15),
        "hidden": _int(config, "hidden", default=64),
        "out_features": _int(config, "out_features"),
    }
    if normal["kernel_size"] % 2 == 0:
        raise ArchitectureError("config.kernel_size must be odd (same padding)")
    height, width = _cnn_spatial(normal)
    if height < 1 or width < 1:
        raise ArchitectureError("the input is too small for that many pooling layers")
    return normal


def _cnn_spatial(config: dict[str, Any]) -> tuple[int, int]:
    height, width = config["height"], config["width"]
    for _ in config["channels"]:
        height, width = height // 2, width // 2  # MaxPool2d(2) floors
    return height, width


def _cnn_param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    k, previous = config["kernel_size"], config["in_channels"]
    for layer, channels in enumerate(config["channels"]):
        index = 3 * layer  # Conv2d, ReLU, MaxPool2d per block
        shapes[f"features.{index}.weight"] = (channels, previous, k, k)
        shapes[f"features.{index}.bias"] = (channels,)
        previous = channels
    height, width = _cnn_spatial(config)
    flat = previous * height * width
    shapes["classifier.1.weight"] = (config["hidden"], flat)
    shapes["classifier.1.bias"] = (config["hidden"],)
    shapes["classifier.3.weight"] = (config["out_features"], config["hidden"])
    shapes["classifier.3.bias"] = (config["out_features"],)
    return shapes


def _cnn_build(config: dict[str, Any]) -> Any:
    from torch import nn

    k, previous, blocks = config["kernel_size"], config["in_channels"], []
    for channels in config["channels"]:
        blocks += [nn.Conv2d(previous, channels, k, padding=k // 2), nn.ReLU(), nn.MaxPool2d(2)]
        previous = channels
    height, width = _cnn_spatial(config)

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Linear(previous * height * width, config["hidden"]),
                nn.ReLU(),
                nn.Linear(config["hidden"], config["out_features"]),
            )

        def forward(self, x: Any) -> Any:
            return self.classifier(self.features(x))

    return SmallCNN()


REGISTRY: dict[str, Architecture] = {
    "mlp": Architecture(
        name="mlp",
        normalise=_mlp_normalise,
        param_shapes=_mlp_param_shapes,
        input_shape=lambda c: (c["in_features"],),
        output_dim=lambda c: c["out_features"],
        build=_mlp_build,
    ),
    "cnn": Architecture(
        name="cnn",
        normalise=_cnn_normalise,
        param_shapes=_cnn_param_shapes,
        input_shape=lambda c: (c["in_channels"], c["height"], c["width"]),
        output_dim=lambda c: c["out_features"],
        build=_cnn_build,
    ),
}


def resolve(architecture: Any, config: Any) -> tuple[Architecture, dict[str, Any]]:
    """Look an architecture up and normalise its config, or raise ArchitectureError saying why."""
    if not isinstance(architecture, str) or architecture not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ArchitectureError(f"unknown architecture {architecture!r}; known: {known}")
    if not isinstance(config, dict):
        raise ArchitectureError("model.config must be an object")
    arch = REGISTRY[architecture]
    normal = arch.normalise(config)
    total = sum(_product(shape) for shape in arch.param_shapes(normal).values())
    if total > MAX_PARAMETERS:
        raise ArchitectureError(f"the model has {total:,} parameters; the limit is {MAX_PARAMETERS:,}")
    return arch, normal


def _product(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
