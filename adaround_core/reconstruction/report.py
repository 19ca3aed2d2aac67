"""``ReconstructionReport``: what ``weight_reconstruction`` returns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from adaround_core.reconstruction.layer_reconstruction import LayerReport


@dataclass
class ReconstructionReport:
    """Per-layer outcomes, in the order the layers were rounded."""

    layers: list[LayerReport] = field(default_factory=list)
    num_threads: int = 1  # threads of capture and setup; each layer's own: LayerReport.threads
    capture_method: str = "one_pass"  # or "per_layer": how layer inputs were captured
    capture_note: str = ""  # why capture fell back to "per_layer" (empty otherwise)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerReport:
        return self.layers[index]

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    def to_records(self) -> list[dict]:
        """One plain dict per layer (for JSON, MLflow tables, DataFrames)."""
        return [asdict(layer) for layer in self.layers]

    def format_table(self) -> str:
        """A fixed-width text table of the per-layer outcomes (with ``guard: output``, also
        the model's output errors)."""
        width = max([len("layer"), *(len(r.name) for r in self.layers)])
        model = any(r.nearest_output_mse is not None for r in self.layers)
        extra = f" {'nearest out':>12} {'AdaRound out':>12}" if model else ""
        rows = [f"{'layer':<{width}} {'nearest MSE':>12} {'AdaRound MSE':>12}{extra} "
                f"{'kept':>15} {'s':>7} {'thr':>3} {'GFLOP/step':>10}"]
        for r in self.layers:
            extra = f" {_number(r.nearest_output_mse)} {_number(r.adaround_output_mse)}" \
                if model else ""
            rows.append(f"{r.name:<{width}} {r.nearest_mse:>12.4g} {r.adaround_mse:>12.4g}"
                        f"{extra} {r.decision:>15} {r.seconds:>7.2f} {r.threads:>3} "
                        f"{r.step_flops / 1e9:>10.4g}")
        return "\n".join(rows)


def _number(value: float | None) -> str:
    return f"{'-':>12}" if value is None else f"{value:>12.4g}"
