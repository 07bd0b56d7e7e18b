"""A small ONNX graph builder: unique names, initializers, constants and nodes.

It keeps everything a graph needs in one object that the lowering functions append to,
so each lowering is a plain function ``(builder, input_name, ...) -> output_name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"


@dataclass
class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph."""

    name: str = "ptq"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)
    _consts: dict[tuple[str, bytes, tuple[int, ...]], str] = field(default_factory=dict)
    uses_ms_domain: bool = False
    memo: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Subgraphs shared by several lowerings (e.g. one input quantization for q/k/v)."""

    def fresh(self, hint: str) -> str:
        """A name not used before, derived from ``hint``."""
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a numpy array as an initializer and return its (unique) name."""
        unique = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), unique))
        return unique

    def raw_initializer(
        self, name: str, data_type: int, dims: Sequence[int], raw: bytes | np.ndarray
    ) -> str:
        """An initializer from raw bytes (float8, packed int4) with an explicit type."""
        unique = self.fresh(name)
        payload = raw.tobytes() if isinstance(raw, np.ndarray) else raw
        tensor = helper.make_tensor(unique, data_type, list(dims), payload, raw=True)
        self.initializers.append(tensor)
        return unique

    def int4_initializer(self, name: str, values: np.ndarray, signed: bool) -> str:
        """An INT4/UINT4 initializer from unpacked values (packed two per byte, low first)."""
        unique = self.fresh(name)
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        flat = values.astype(np.int64).ravel().tolist()
        self.initializers.append(helper.make_tensor(unique, dtype, list(values.shape), flat))
        return unique

    def const(self, value: Any, dtype: type = np.int64) -> str:
        """A shared constant initializer (scalars and small vectors)."""
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self.initializer("const", arr)
        return self._consts[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        n_out: int = 1,
        name: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        """Append a node; returns its first output name (see :meth:`op_multi`)."""
        return self.op_multi(op_type, inputs, n_out=n_out, name=name, domain=domain, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        n_out: int = 1,
        name: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Append a node with ``n_out`` fresh outputs and return their names."""
        base = self.fresh(name or op_type)
        outs = [base if i == 0 else f"{base}:{i}" for i in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs)
        self.nodes.append(node)
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        return outs

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(
        self, source: str, name: str, elem_type: int, shape: Sequence[int | str]
    ) -> None:
        """Expose ``source`` as graph output ``name`` (through Identity when renamed)."""
        if source != name:
            self.nodes.append(helper.make_node("Identity", [source], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def to_model(self, producer: str = "ptq") -> onnx.ModelProto:
        """The finished model (opset 21, plus com.microsoft v1 when a contrib op is used)."""
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 10
        return model
