"""train.compile: one graph (fullgraph) for models without routers, graph breaks allowed
around the routed engine. Traced with the aot_eager backend: the same Dynamo capture as
inductor, without its minute of C++ code generation per model."""
import pytest
import torch

from helpers import tiny
from moelab.model import MoELM
from moelab.train.loop import compile_model


@pytest.mark.parametrize("preset", ["dense-tiny", "gated-tiny"])
def test_models_without_routers_compile_as_one_graph(preset):
    torch.manual_seed(0)
    m = MoELM(tiny(base=preset).model).train()
    x = torch.randint(0, 97, (2, 12))
    torch._dynamo.reset()
    cm = compile_model(m, backend="aot_eager")  # fullgraph=True: a graph break would raise
    out = cm(x, x)
    out.loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(x, x)
    ref.loss.backward()
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    for g, p in zip(grads, m.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_routed_models_compile_with_graph_breaks(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    compile_model(MoELM(tiny(base="moe-tiny").model))
    assert seen["fullgraph"] is False
    compile_model(MoELM(tiny().model))
    assert seen["fullgraph"] is True
